"""The scoring workers' Celery app. Importing it loads no model (the engine is loaded by `workers.main` before
consuming) and no webhook code (the webhook worker, `webhooks.worker`, uses no Celery)."""

from celery import Celery

from schemas.settings import get_settings
from store.queueing import celery_config
from workers.lease import keep_leases

app = Celery("rerankfarm", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))
keep_leases(app)
