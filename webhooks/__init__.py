"""Webhooks: where they may go (`ssrf`), one delivery attempt as plain code (`delivery`), and the webhook worker that
schedules attempts from Redis (`worker`, run by `rerankfarm webhooks`). GPU workers import none of it: a job's
final-state script only puts the job in the due set."""
