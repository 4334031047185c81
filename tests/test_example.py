"""The training example, short: torch.nn and fusednorm.convert() copies trained from the
same weights on the same batches give (nearly) the same loss curves and accuracy."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.mark.slow
def test_train_digits_short_run_matches():
    pytest.importorskip("sklearn", reason="scikit-learn is part of the test extra: pip install '.[test]'")
    import train_digits

    results = train_digits.main(["--epochs", "2", "--no-plot"])
    ref_losses, ref_acc, _ = results["torch.nn"]
    fn_losses, fn_acc, _ = results["fusednorm"]
    for a, b in zip(ref_losses, fn_losses):
        # float32 training of the same model on the same batches: the curves agree to a
        # few float32 roundings per step, compounded over ~45 SGD steps.
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (ref_losses, fn_losses)
    assert abs(ref_acc - fn_acc) <= 0.01
    assert ref_acc > 0.8  # it really learns
