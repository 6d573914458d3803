"""Every distinct block shape of the chosen models: eager vs each fused backend (inference)."""


def test_block(run_case, workload, contender):
    run_case(workload, contender)
