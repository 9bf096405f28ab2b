"""Live streams: POST /v1/streams (with the app's key) gives a single-use, short-lived token;
WebSocket /v1/stream takes it as its first message, then audio (service.live_streams)."""
from fastapi import APIRouter, WebSocket
from sqlalchemy.orm import Session

from service.auth import CurrentKey
from service.deps import SettingsDep, WriterDep
from service.errors import ERROR_RESPONSES
from service.live_streams import LiveStream
from service.schemas import StreamIn, StreamOut
from storage.stream_tokens import StreamTokenRepository

router = APIRouter(prefix="/v1", tags=["streams"], responses=ERROR_RESPONSES)


@router.post("/streams", status_code=201, response_model=StreamOut)
async def create_stream(body: StreamIn, caller: CurrentKey, writer: WriterDep,
                        settings: SettingsDep) -> StreamOut:
    def insert(session: Session):
        token, row = StreamTokenRepository(session).create(
            api_key_id=caller.key_id, user_id=body.user_id, sample_rate=body.sample_rate,
            ttl_s=settings.api.stream_token_ttl_s)
        return token, row.expires_at

    token, expires_at = await writer.write(insert)
    return StreamOut(token=token, expires_at=expires_at, socket_path="/v1/stream",
                     sample_rate=body.sample_rate,
                     max_chunk_bytes=settings.api.stream_max_chunk_bytes,
                     window_s=settings.timeline.window_s, hop_s=settings.timeline.hop_s)


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    await LiveStream(websocket).run()
