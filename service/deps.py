"""Typed dependencies the routes declare, all made once per app in `service.app`: database
sessions, the group-commit writer, the artifact store, the inference engine, the store probe,
the settings.

They are `async def` because they do no I/O: FastAPI runs a sync dependency in a worker
thread, and a thread hop per dependency per request costs more than the dependency itself.
A session connects on its first query, in the sync route that makes it."""
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.engine import InferenceEngine
from service.group_commit import GroupCommitWriter
from service.store_probe import StoreProbe
from storage.artifacts import ArtifactStore
from storage.settings import Settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for reads and writes (on SQLite, its transactions take the write lock)."""
    with request.app.state.session_factory() as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """A session for reads only: on SQLite it never waits for a writer's commit."""
    with request.app.state.read_session_factory() as session:
        yield session


async def get_read_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.read_session_factory


async def get_writer(request: Request) -> GroupCommitWriter:
    return request.app.state.writer


async def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


async def get_store_probe(request: Request) -> StoreProbe:
    return request.app.state.store_probe


async def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
ReadSessionsDep = Annotated[sessionmaker[Session], Depends(get_read_session_factory)]
WriterDep = Annotated[GroupCommitWriter, Depends(get_writer)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
StoreProbeDep = Annotated[StoreProbe, Depends(get_store_probe)]
SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]
