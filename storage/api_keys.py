"""API keys: stored as sha256 hashes; the plaintext exists only in the answer to `create`."""
import secrets

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.files import sha256_bytes
from storage.models import KEY_ROLES, ApiKey, utcnow

KEY_PREFIX = "emo_"


def hash_key(plaintext: str) -> str:
    # A fast hash is enough: keys carry 256 random bits, see ApiKey.key_hash.
    return sha256_bytes(plaintext.encode())


class ApiKeyRepository:
    def __init__(self, session: Session):
        self.session = session

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        """A new key; returns the row and the plaintext, which is not stored and cannot be
        shown again."""
        if role not in KEY_ROLES:
            raise ValueError(f"role must be one of {KEY_ROLES}, not {role!r}")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes = 256 bits
        key = ApiKey(name=name, role=role, key_hash=hash_key(plaintext),
                     prefix=plaintext[:len(KEY_PREFIX) + 6])
        self.session.add(key)
        self.session.flush()
        return key, plaintext

    def verify(self, plaintext: str) -> ApiKey | None:
        """The key's row if the plaintext is a key that was created and not revoked, else
        None."""
        return self.session.scalars(select(ApiKey).where(
            ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))).one_or_none()

    def list_keys(self) -> list[ApiKey]:
        """All keys, revoked ones included, oldest first."""
        return list(self.session.scalars(select(ApiKey).order_by(ApiKey.id)))

    def revoke(self, key_id: int) -> bool:
        """Revoke a key at once; False if there is no such unrevoked key."""
        result = self.session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow()).execution_options(synchronize_session="fetch"))
        return result.rowcount == 1

    def bootstrap(self) -> dict[str, str] | None:
        """First run: when no key was ever created, create one app key and one admin key and
        return their plaintexts by role, for printing once. None when keys exist."""
        if self.session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        return {role: self.create(f"first-{role}", role)[1] for role in ("app", "admin")}
