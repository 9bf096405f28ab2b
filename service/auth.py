"""API keys: `Authorization: Bearer KEY`. Any valid key may predict and read and correct its own
predictions; admin endpoints need a key with the admin role."""
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.deps import ReadSessionDep
from service.errors import ApiError, unauthorized
from storage.api_keys import ApiKeyRepository
from storage.models import ApiKey

# auto_error=False: a missing header gets our 401 body, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="An emoloop API key")


def current_key(session: ReadSessionDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                ) -> ApiKey:
    if credentials is None:
        raise unauthorized("missing API key: send `Authorization: Bearer KEY`")
    key = ApiKeyRepository(session).verify(credentials.credentials)
    # End the read transaction now: the request may have model work ahead, and a snapshot held
    # open would keep SQLite's WAL from being checkpointed. The row stays usable.
    session.commit()
    if key is None:
        raise unauthorized("the API key is not valid or was revoked")
    return key


def admin_key(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
    if key.role != "admin":
        raise ApiError(403, "forbidden", "this endpoint needs an admin key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
AdminKey = Annotated[ApiKey, Depends(admin_key)]
