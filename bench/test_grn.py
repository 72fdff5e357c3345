import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("grn"))
def test_grn(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
