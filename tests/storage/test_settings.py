"""Where each setting comes from: Settings(...) > environment > YAML file > built-in defaults."""
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage import settings as settings_module
from storage.settings import REPO_ROOT, Settings, get_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("EMOLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # relative paths and the working directory must not matter
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_without_a_config_file_the_builtin_defaults_apply(monkeypatch, tmp_path):
    # An installed copy has no configs/ folder beside it.
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "absent.yaml")
    settings = Settings()
    assert settings.storage.data_dir == tmp_path / "data"
    assert settings.database.url == f"sqlite:///{tmp_path / 'data' / 'emoloop.db'}"
    assert settings.api.port == 8000 and settings.learner.min_new_feedback == 50


def test_the_repository_default_yaml_is_found_from_any_directory():
    assert settings_module.config_file() == REPO_ROOT / "configs" / "default.yaml"
    settings = Settings()
    assert settings.database.url.startswith("sqlite:///")
    assert settings.learner.enabled is True


def test_yaml_beats_defaults_and_env_beats_yaml(monkeypatch, tmp_path):
    config = write_yaml(tmp_path, "api:\n  port: 9001\n  workers: 3\nlearner:\n  interval_s: 5\n")
    monkeypatch.setenv("EMOLOOP_CONFIG", str(config))
    settings = Settings()
    assert (settings.api.port, settings.api.workers, settings.learner.interval_s) == (9001, 3, 5)
    assert settings.api.max_upload_bytes == 10 * 1024 * 1024  # not in the file: default

    monkeypatch.setenv("EMOLOOP_API__PORT", "9002")
    monkeypatch.setenv("EMOLOOP_LEARNER__ENABLED", "false")
    settings = Settings()
    assert (settings.api.port, settings.api.workers) == (9002, 3)  # one key, not the section
    assert settings.learner.enabled is False


def test_explicit_arguments_beat_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("EMOLOOP_API__PORT", "9002")
    settings = Settings(api={"port": 9100}, storage={"data_dir": tmp_path / "elsewhere"})
    assert settings.api.port == 9100
    assert settings.database.url == f"sqlite:///{tmp_path / 'elsewhere' / 'emoloop.db'}"


def test_data_dir_moves_the_sqlite_file_and_database_url_replaces_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EMOLOOP_DATA_DIR", "state")
    settings = Settings()
    assert settings.storage.data_dir == tmp_path / "state"
    assert settings.storage.artifacts_dir == tmp_path / "state" / "artifacts"
    assert settings.database.url == f"sqlite:///{tmp_path / 'state' / 'emoloop.db'}"

    monkeypatch.setenv("EMOLOOP_DATABASE_URL", "postgresql+psycopg://u:p@127.0.0.1/emo")
    settings = Settings()
    assert settings.database.url == "postgresql+psycopg://u:p@127.0.0.1/emo"
    assert settings.storage.data_dir == tmp_path / "state"  # artifacts stay on disk


def test_the_postgres_config_selects_postgresql_and_the_env_url_overrides_it(monkeypatch):
    monkeypatch.setenv("EMOLOOP_CONFIG", str(REPO_ROOT / "configs" / "postgres.yaml"))
    assert Settings().database.url.startswith("postgresql+psycopg://")
    assert Settings().storage.artifacts == "database"  # the database is all the nodes share
    monkeypatch.setenv("EMOLOOP_DATABASE_URL", "postgresql+psycopg://other@127.0.0.1/x")
    assert Settings().database.url == "postgresql+psycopg://other@127.0.0.1/x"


def test_a_missing_config_file_or_a_misspelt_key_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("EMOLOOP_CONFIG", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(FileNotFoundError):
        Settings()
    monkeypatch.setenv("EMOLOOP_CONFIG", str(write_yaml(tmp_path, "api:\n  prot: 9001\n")))
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("EMOLOOP_CONFIG")
    monkeypatch.setenv("EMOLOOP_API__PROT", "1")
    with pytest.raises(ValidationError):
        Settings()


def test_get_settings_is_read_once(monkeypatch):
    monkeypatch.setenv("EMOLOOP_API__PORT", "9003")
    assert get_settings() is get_settings()
    monkeypatch.setenv("EMOLOOP_API__PORT", "9004")
    assert get_settings().api.port == 9003
    get_settings.cache_clear()
    assert get_settings().api.port == 9004


def test_the_bolder_candidate_changes_only_training_settings_and_can_be_switched_off(
        monkeypatch, tmp_path):
    bolder, configured = Settings().learner.candidate_settings()
    assert (bolder.batch_size, configured.batch_size) == (32, 16)
    assert bolder.model_dump() == {**configured.model_dump(), **configured.bolder, "bolder": None}
    # What a round keeps (its buffer, its feedback) is not the bolder candidate's to change,
    # and a bad value stops the service at start-up, not a round later.
    config = write_yaml(tmp_path, "learner:\n  bolder: {mem_size: 10}\n")
    monkeypatch.setenv("EMOLOOP_CONFIG", str(config))
    with pytest.raises(ValidationError, match="learner.bolder may change"):
        Settings()
    config.write_text("learner:\n  bolder: {batch_size: 1.5}\n")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()
    monkeypatch.setenv("EMOLOOP_LEARNER__BOLDER", "null")
    assert [s.bolder for s in Settings().learner.candidate_settings()] == [None]


@pytest.mark.parametrize("setting, value", [
    ("BATCH_SIZE", "0"), ("REPLAY_BATCH_SIZE", "0"), ("STEPS", "0"), ("LR", "0"),
    ("LR", "-0.001"), ("WEIGHT_DECAY", "-1"), ("CROP_FRAMES", "0"), ("MEM_SIZE", "0"),
    ("EWC_LAMBDA", "-5"), ("DISTILL_WEIGHT", "-1"), ("EWC_DECAY", "1.5"),
    ("MAX_FEEDBACK_PER_ROUND", "0"), ("MIN_STEPS", "500")])
def test_a_learner_setting_no_round_could_train_with_stops_the_service_at_start_up(
        monkeypatch, setting, value):
    """Not a round later, as a failed round whose feedback waits for the next, equally failed."""
    monkeypatch.setenv(f"EMOLOOP_LEARNER__{setting}", value)
    with pytest.raises(ValidationError, match=setting.lower()):
        Settings()


def test_the_bolder_candidates_values_are_held_to_the_same_bounds(monkeypatch, tmp_path):
    config = write_yaml(tmp_path, "learner:\n  bolder: {lr: -0.01}\n")
    monkeypatch.setenv("EMOLOOP_CONFIG", str(config))
    with pytest.raises(ValidationError, match="lr"):
        Settings()
