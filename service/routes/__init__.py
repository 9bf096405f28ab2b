"""The API's routes, one small module per resource."""
from fastapi import APIRouter

from service.routes import (admin, feedback, health, models, predictions, recordings, runs,
                            streams, users)

api_router = APIRouter()
api_router.include_router(predictions.router)
api_router.include_router(feedback.router)
api_router.include_router(recordings.router)
api_router.include_router(streams.router)
api_router.include_router(models.router)
api_router.include_router(admin.router)
api_router.include_router(runs.router)
api_router.include_router(users.router)
api_router.include_router(health.router)
