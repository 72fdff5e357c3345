import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("sparse_max_pool2d"))
def test_sparse_max_pool2d(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
