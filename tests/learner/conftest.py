from pathlib import Path

import pytest

from tests.learner.toy_corpus import make_corpus


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))
