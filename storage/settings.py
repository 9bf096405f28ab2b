"""All configuration, in one pydantic-settings class.

Precedence, highest first: arguments to `Settings(...)`, environment, the YAML file, the defaults
below. The YAML file is `EMOLOOP_CONFIG` if set (it must exist), else `configs/default.yaml` in
the repository; an installed copy without that file runs on the defaults.

Environment: `EMOLOOP_<SECTION>__<KEY>` sets any single setting (`EMOLOOP_API__PORT=9000`), and two
short names exist for what deployments change most: `EMOLOOP_DATA_DIR` (where the SQLite file and
the artifacts live; default `./data`, relative to the working directory) and
`EMOLOOP_DATABASE_URL`.
"""
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource,
                               SettingsConfigDict, YamlConfigSettingsSource)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "configs" / "default.yaml"
SQLITE_FILE_NAME = "emoloop.db"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key in YAML or env is an error


class DatabaseSettings(Section):
    url: str | None = None  # None: SQLite file `emoloop.db` in the data dir
    # How long a write waits for a lock (SQLite: the write lock; PostgreSQL: lock_timeout) before
    # it fails, and the API answers 503 with Retry-After.
    busy_timeout_s: float = 10.0


class RetentionSettings(Section):
    """Days each kind of stored data is kept; None keeps it forever (the default). Applied by the
    learner's scheduled check and `emoloop storage prune` (storage/retention.py), which never
    touch what a version, a replay buffer, a gate set, a personal model or feedback needs."""

    # Predictions no feedback came for (rows; their clips go with them unless still used).
    predictions_days: float | None = Field(None, gt=0)
    # The clips of predictions no feedback came for: their bytes, sooner than the rows.
    clips_days: float | None = Field(None, gt=0)
    # Candidate versions the gate rejected: their model and state files and replay buffers
    # (the row stays, as `deleted`, with its gate report).
    rejected_versions_days: float | None = Field(None, gt=0)
    # Finished rounds: their counts, gate report and error text (the row, status and candidate
    # stay; a registered candidate keeps its own gate report).
    run_details_days: float | None = Field(None, gt=0)


class StorageSettings(Section):
    data_dir: Path = Path("data")
    # Where clips and model files live: `local` files under data_dir/artifacts (one machine), or
    # `database` rows in the SQL store (PostgreSQL: the one state every node shares).
    artifacts: Literal["local", "database"] = "local"
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    # Files no row refers to (left by a crash) are deleted once this old (storage/sweep.py).
    sweep_after_s: float = Field(3600.0, ge=0.0)
    # Below this much free space on the data dir's disk new clips are refused (507) before
    # anything is written, and /ready says not ready: what is left keeps the database, the
    # learner's model files and corrections writable. 0 turns the check off.
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0)

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_upload_bytes: int = 10 * 1024 * 1024
    max_audio_seconds: float = 30.0
    # Long recordings (POST /v1/recordings): their own limits, and how long the request waits
    # for the answer before it becomes a job (202, then GET /v1/recordings/{id}).
    max_recording_seconds: float = 1800.0
    max_recording_bytes: int = 200 * 1024 * 1024
    recording_wait_s: float = Field(3.0, ge=0.0)
    # Live streams (POST /v1/streams, then WebSocket /v1/stream).
    stream_token_ttl_s: float = Field(30.0, gt=0.0)  # a token unused this long is refused
    stream_max_chunk_bytes: int = Field(64 * 1024, gt=0)  # one audio message at most
    stream_idle_timeout_s: float = Field(10.0, gt=0.0)  # no message this long closes the stream
    stream_max_ahead_s: float = Field(2.0, ge=0.0)  # audio beyond real time a client may send
    stream_keep_seconds: float = Field(300.0, gt=0.0)  # recent audio kept for corrections
    # Workers in other processes notice a newly activated model by polling the DB this often.
    model_poll_interval_s: float = 1.0
    # A POST repeated with the same Idempotency-Key this long after the first gets its answer.
    idempotency_window_s: float = Field(24 * 3600.0, gt=0.0)
    # Connection hygiene (service/connections.py; the README's "Slow and greedy clients" gives
    # the reasons for each default). A reverse proxy in front may take these over.
    # Open connections per worker; beyond it a new one gets a fast 503. Lowered at start to fit
    # the open-file limit (each connection may hold two descriptors: socket and spool file).
    max_connections: int = Field(4096, ge=1)
    # The request line and headers must arrive within this, counted from their first byte ...
    header_timeout_s: float = Field(10.0, gt=0)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # ... and be at most this large (else 431)
    # A body's deadline: body_timeout_s, plus one second for every body_min_rate_bytes_s bytes
    # received, at most body_max_timeout_s (mod_reqtimeout's rule); past it, 408.
    body_timeout_s: float = Field(10.0, gt=0)
    body_min_rate_bytes_s: int = Field(16 * 1024, ge=1)
    body_max_timeout_s: float = Field(60.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)  # an idle connection is closed after this
    # Upload bytes a request keeps in memory; past this the body goes to a temporary file.
    spool_threshold_bytes: int = Field(64 * 1024, ge=0)


class TimelineSettings(Section):
    """Long recordings (and streams) as overlapping windows, smoothed by an HMM
    (learner/timeline.py, learner/smoothing.py)."""
    window_s: float = Field(3.0, gt=0.25)
    hop_s: float = Field(1.0, gt=0.0)
    # The HMM's chance of keeping its state from one window to the next: expected dwell time
    # hop_s / (1 - self_transition); learner/smoothing.py says why this value.
    self_transition: float = Field(0.9, gt=0.0, lt=1.0)
    speech_db: float = -50.0  # a 25 ms frame louder than this (dBFS RMS) counts as speech
    min_speech_s: float = Field(0.25, ge=0.0)  # a window with less speech is a silence window
    batch_size: int = Field(32, ge=1)  # windows the model sees at once


class LearnerSettings(Section):
    enabled: bool = True  # run the in-process scheduler
    interval_s: float = 600.0  # how often the scheduler checks for new feedback
    min_new_feedback: int = 50  # a round starts once this much unconsumed feedback exists
    lock_ttl_s: float = 120.0  # a round renews its lease; a crashed round's ends after this
    # What a round does (learner/continual/rounds.py); the README's "Learner" section explains each.
    strategy: Literal["ewc+replay", "replay", "naive", "joint"] = "ewc+replay"
    # The labels feedback may name; None: every canonical label (learner.labels). A subset of them.
    labels: list[str] | None = None
    allow_new_labels: bool = True  # a label the model does not know grows its head
    # The gate (learner/continual/gate.py): refuse when the evidence says an old class lost more
    # recall than this, at this confidence (family-wise, over the classes and the new feedback);
    # and refuse held-out feedback the candidate agrees with no more than chance, at this one.
    max_recall_drop: float = Field(0.02, ge=0.0, le=1.0)
    gate_confidence: float = Field(0.95, gt=0.5, lt=1.0)
    holdout_share: float = Field(0.2, ge=0.0, lt=1.0)  # of each round's feedback, for the gate
    # Rounds one piece of feedback may go through: a refused round gives its feedback back to
    # the next one until then, so corrections are not lost to one close call of the gate, and a
    # poisoned batch still goes away (after blocking one more round).
    max_attempts: int = Field(2, ge=1)
    # The oldest first; the rest waits for the next round.
    max_feedback_per_round: int = Field(1000, ge=1)
    seed: int = 20261121
    # A round trains this many steps whatever its size, so its time stays bounded: each step
    # `batch_size` new clips and `replay_batch_size` replayed exemplars.
    steps: int = Field(60, ge=1)
    # Or, with `passes`, steps that follow the round's size: this many passes over its new
    # clips (each step `batch_size` of them), within [min_steps, max_steps]. None: `steps`.
    passes: float | None = Field(None, gt=0)
    min_steps: int = Field(20, ge=1)
    max_steps: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1)
    replay_batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)  # falls linearly to 0 over the round
    weight_decay: float = Field(0.01, ge=0)
    crop_frames: int = Field(300, ge=1)  # random 3 s crops in training; the gate hears whole clips
    freeze_batchnorm: bool = True  # a few clips of new speakers must not move old statistics
    # On a model on a speech encoder, rounds leave the layers that read the encoder's states (each
    # branch's block norm and projection) as they are and train what comes after them.
    freeze_input_layers: bool = False
    mem_size: int = Field(400, ge=1)  # replay buffer, split evenly over the classes
    # The old data replay and the gate start from (base_replay/base_gate.safetensors); None: the
    # sets shipped beside the bundled default model (learner/default_model).
    base_sets_dir: Path | None = None
    ewc_lambda: float = Field(1e5, ge=0)
    # Replayed exemplars also pull toward the starting model's answers, by this weight.
    distill_weight: float = Field(3.0, ge=0)
    ewc_decay: float = Field(0.9, ge=0, le=1)  # online EWC: old importances fade so much a round
    # A round first trains a bolder candidate, with these of the settings above changed; if the
    # gate refuses it, the candidate of the settings as they are. The default, chosen on
    # validation speakers (`emoloop bench round-settings`, README "Choosing learner settings"),
    # learns new voices several times faster where the gate sees no loss, and the fallback keeps
    # rounds the bolder one would lose. None or {}: one candidate, as configured.
    bolder: dict[str, float] | None = {"batch_size": 32, "ewc_lambda": 30000.0,
                                       "distill_weight": 0.0}

    @model_validator(mode="after")
    def _bolder_is_valid(self) -> "LearnerSettings":
        if unknown := set(self.bolder or {}) - set(BOLDER_KEYS):
            raise ValueError(f"learner.bolder may change {', '.join(BOLDER_KEYS)}; not "
                             f"{', '.join(sorted(unknown))}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"learner.min_steps ({self.min_steps}) is above learner.max_steps "
                             f"({self.max_steps})")
        self.candidate_settings()  # a bad value fails here, at start-up, not in a round
        return self

    def candidate_settings(self) -> list["LearnerSettings"]:
        """The settings of the candidates a round tries in turn: the bolder one, if any, then
        these."""
        if not self.bolder:
            return [self]
        bolder = LearnerSettings(**{**self.model_dump(), **self.bolder, "bolder": None})
        return [bolder, self]


# What `learner.bolder` may change: how a candidate trains, not what a round takes or keeps.
BOLDER_KEYS = ("steps", "passes", "min_steps", "max_steps", "batch_size", "replay_batch_size",
               "lr", "weight_decay", "crop_frames", "ewc_lambda", "distill_weight")


class PersonalSettings(Section):
    enabled: bool = True
    min_feedback: int = 20  # corrections a user needs before getting a personal model
    # Personal rounds (learner/personal/rounds.py); the README's "Personal models" says more.
    folds: int = Field(4, ge=2)  # the gate judges the user's corrections by cross-validation
    # The gate: most macro recall (mean over the old classes) the personal model may lose on the
    # global gate set. Looser than learner.max_recall_drop: this model answers one user only.
    max_recall_drop: float = Field(0.03, ge=0.0, le=1.0)
    # Personal rounds one scheduler tick runs, oldest requests first. A round on the bundled
    # model takes under a minute on one core (five trainings: four for cross-validation; 49 s on
    # the five-branch default), under the learner's lock: ten keep a tick within
    # `learner.interval_s` (README).
    max_users_per_tick: int = 10
    # Training (learner/personal/training.py): steps of `batch_size` of the user's clips and
    # `replay_batch_size` of the global version's replay exemplars (they hold it near the global
    # model), at a constant learning rate; chosen on the validation users (README).
    steps: int = Field(60, ge=1)
    batch_size: int = Field(16, ge=1)
    replay_batch_size: int = Field(16, ge=1)
    lr: float = 0.001
    # The memory of the user's corrections (learner/personal/model.CorrectionMemory): its share
    # of the answer (0: the head alone) for a clip whose embedding is at least `memory_threshold`
    # similar (cosine) to a correction's, the corrections voting, and how many are kept.
    memory_weight: float = Field(0.5, ge=0.0, le=1.0)
    memory_threshold: float = Field(0.7, ge=-1.0, le=1.0)
    memory_neighbours: int = Field(3, ge=1)
    memory_size: int = Field(100, ge=1)  # the newest corrections; 2 bytes a dimension each
    # Serving, per worker process: personal versions kept in memory (a head, input layers and
    # memory, about 410 KB each on the bundled model, 200 took 82.3 MB: its head reads 4,096
    # numbers, the memory keeps the branches' 640 of them; a version not cached loads in about
    # 4 ms, README), and global versions other than the active one kept loaded for personal
    # versions built on them.
    cache_size: int = Field(200, ge=1)
    global_cache_size: int = Field(2, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOLOOP_", env_nested_delimiter="__",
                                      extra="forbid")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    timeline: TimelineSettings = Field(default_factory=TimelineSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    personal: PersonalSettings = Field(default_factory=PersonalSettings)

    @model_validator(mode="after")
    def _resolve_paths(self) -> "Settings":
        # Absolute from here on, so a later chdir cannot move the data.
        self.storage.data_dir = self.storage.data_dir.expanduser().resolve()
        if self.database.url is None:
            self.database.url = f"sqlite:///{self.storage.data_dir / SQLITE_FILE_NAME}"
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, ShortEnvNames(settings_cls), env_settings,
                YamlConfigSettingsSource(settings_cls, yaml_file=config_file()))


class ShortEnvNames(EnvSettingsSource):
    """`EMOLOOP_DATA_DIR` and `EMOLOOP_DATABASE_URL`, the documented names for the two settings
    every deployment sets; they win over the long `EMOLOOP_STORAGE__DATA_DIR` forms."""

    NAMES = {"EMOLOOP_DATA_DIR": ("storage", "data_dir"),
             "EMOLOOP_DATABASE_URL": ("database", "url")}

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (section, key) in self.NAMES.items():
            if os.environ.get(name):
                values.setdefault(section, {})[key] = os.environ[name]
        return values


def config_file() -> Path | None:
    explicit = os.environ.get("EMOLOOP_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"EMOLOOP_CONFIG names {path}, which does not exist")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests build `Settings(...)` themselves, or call
    `get_settings.cache_clear()` after changing the environment."""
    return Settings()
