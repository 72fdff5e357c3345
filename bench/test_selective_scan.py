import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("selective_scan"))
def test_selective_scan(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
