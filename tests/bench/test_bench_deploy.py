"""`bench deploy` on the digits CNN: one row per converted form and runtime, each export checked."""

from __future__ import annotations

import pytest

from lightning_struct.deploy.runtime import has_onnx


@pytest.mark.slow
@pytest.mark.skipif(not has_onnx(), reason="the export extra is not installed")
def test_bench_deploy_rows_for_every_form_and_runtime():
    from lightning_struct.bench import deploy

    net = deploy.train_digits_with_force(epochs=1)
    variants = deploy._variants_digits(net)
    assert {"dense", "lowrank e0.95", "lowrank params 0.5", "acdc linears"} <= set(variants)
    rows = deploy._bench("digits", variants, (1, 8, 8), [1, 4], compile_=False, repeats=2)
    cases = {r.case for r in rows}
    for label in ("lowrank e0.95", "lowrank params 0.5", "acdc linears"):
        for batch in (1, 4):
            for runtime in ("eager", "onnxruntime"):
                assert f"digits {label} b{batch} {runtime}" in cases
    for r in rows:
        assert r.ours_s > 0 and r.baseline_s > 0 and r.baseline == "dense"
        assert r.extra["export_rel_error"] <= 1e-4
    budget = next(r for r in rows if "params 0.5" in r.case)
    assert budget.extra["params_converted"] < budget.extra["params_dense"]
