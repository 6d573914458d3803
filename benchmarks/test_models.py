"""Whole torchvision models: eager vs ``fusedres.convert(model, backend=...)`` (inference)."""


def test_model(run_case, workload, contender):
    run_case(workload, contender)
