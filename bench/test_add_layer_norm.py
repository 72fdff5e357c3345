import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("add_layer_norm"))
def test_add_layer_norm(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
