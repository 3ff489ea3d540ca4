import numpy as np
import pytest
import torch

from robustmri.abstention import AbstentionState, abstention_path, load_state, save_state


def _state(sha="a" * 64):
    rng = np.random.default_rng(0)
    return AbstentionState(score="mahalanobis", arrays={"means": rng.normal(size=(3, 4)), "factor": np.eye(4)},
                           threshold=2.5, target_acceptance=0.95, acceptance=0.96, checkpoint_sha256=sha,
                           fitted_on={"kind": "training split", "n": 10}, calibrated_on={"kind": "validation split", "n": 5})


def test_the_state_sits_beside_its_checkpoint_and_round_trips(tmp_path):
    checkpoint = tmp_path / "model_site.pt"
    assert abstention_path(checkpoint) == str(tmp_path / "model_site_abstention.pt")
    assert load_state(checkpoint) is None
    state = _state()
    save_state(state, checkpoint)
    loaded = load_state(checkpoint, checkpoint_sha256="a" * 64)
    np.testing.assert_array_equal(loaded.arrays["means"], state.arrays["means"])
    assert (loaded.score, loaded.threshold, loaded.fitted_on) == ("mahalanobis", 2.5, state.fitted_on)
    assert loaded.accepts([2.5, 2.6]).tolist() == [True, False]


def test_a_state_for_other_weights_or_a_foreign_file_is_refused(tmp_path):
    checkpoint = tmp_path / "model.pt"
    save_state(_state(), checkpoint)
    with pytest.raises(ValueError, match="other weights"):
        load_state(checkpoint, checkpoint_sha256="b" * 64)
    (tmp_path / "model_abstention.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable abstention state"):
        load_state(checkpoint)
    torch.save({"version": 99}, tmp_path / "model_abstention.pt")
    with pytest.raises(ValueError, match="version 99"):
        load_state(checkpoint)
