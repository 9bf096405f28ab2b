import pytest
from sqlalchemy import select, text

from storage.api_keys import ApiKeyRepository
from storage.models import ApiKey


def test_a_key_works_once_created_and_only_its_hash_is_stored(session):
    keys = ApiKeyRepository(session)
    row, plaintext = keys.create("mobile app", "app")
    session.commit()
    assert len(plaintext) >= 40 and plaintext.startswith(row.prefix)
    assert keys.verify(plaintext).id == row.id
    assert keys.verify(plaintext + "x") is None
    assert keys.verify("") is None
    stored = session.execute(text("SELECT * FROM api_keys")).one()
    assert all(plaintext not in str(value) for value in stored)
    assert row.key_hash != plaintext and len(row.key_hash) == 64


def test_two_keys_are_different(session):
    keys = ApiKeyRepository(session)
    assert keys.create("a", "app")[1] != keys.create("b", "app")[1]


def test_a_revoked_key_stops_working(session):
    keys = ApiKeyRepository(session)
    row, plaintext = keys.create("old", "admin")
    session.commit()
    assert keys.revoke(row.id) is True
    session.commit()
    assert keys.verify(plaintext) is None
    assert keys.revoke(row.id) is False
    assert keys.list_keys()[0].revoked_at is not None


def test_unknown_roles_are_refused(session):
    with pytest.raises(ValueError):
        ApiKeyRepository(session).create("x", "root")


def test_first_run_bootstrap_creates_one_app_and_one_admin_key_once(session):
    keys = ApiKeyRepository(session)
    created = keys.bootstrap()
    session.commit()
    assert set(created) == {"app", "admin"}
    assert keys.verify(created["app"]).role == "app"
    assert keys.verify(created["admin"]).role == "admin"
    assert keys.bootstrap() is None
    assert len(session.scalars(select(ApiKey)).all()) == 2
