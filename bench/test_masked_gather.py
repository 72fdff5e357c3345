import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("masked_gather"))
def test_masked_gather(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
