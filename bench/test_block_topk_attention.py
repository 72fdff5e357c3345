import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize(("case", "impl"), case_params("block_topk_attention"))
def test_block_topk_attention(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
