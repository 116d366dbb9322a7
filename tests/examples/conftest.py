from tests.training.conftest import data_root  # noqa: F401  (the tiny bundled dataset, built once)
