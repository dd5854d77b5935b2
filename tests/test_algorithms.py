"""Training algorithms against hand computations, and early stopping that every rule can trust."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from robustbench_fvae.algorithms import (
    GroupDRO,
    Reweight,
    balanced_draw,
    inverse_count_weights,
    make_algorithm,
)
from robustbench_fvae.config import ConfigError, TrainConfig
from robustbench_fvae.config.resolve import validate_algorithm
from robustbench_fvae.selection import (
    select_epoch,
    should_stop_all,
    should_stop_early,
    stopping_epoch,
)


def test_groupdro_weights_follow_a_hand_computation():
    """Three steps of online GroupDRO (η = 0.5, C = 2) against numpy: per-group mean losses of
    the batch, q_g·exp(η(ℓ_g + C/√n_g)) for the groups present, normalised; loss = Σ q_g ℓ_g."""
    counts = np.array([100, 4, 0, 25])  # group 2 unpopulated: never weighted
    t = TrainConfig(algorithm="groupdro", groupdro_eta=0.5, groupdro_adjustment=2.0)
    algo = GroupDRO(t, g=np.zeros(3), counts=counts)
    q = np.array([1 / 3, 1 / 3, 0.0, 1 / 3])
    rng = np.random.default_rng(0)
    for groups in ([0, 0, 1, 3], [0, 3, 3, 3], [1, 1, 1, 1]):  # group 1 absent from step 2 ...
        logits = torch.tensor(rng.normal(size=(4, 2)), dtype=torch.float32, requires_grad=True)
        y = torch.tensor(rng.integers(0, 2, size=4))
        g = torch.tensor(groups)
        loss = algo.task_loss(logits, y, g)
        ce = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none").numpy()
        group_loss = np.array([ce[np.array(groups) == k].mean() if k in groups else 0.0
                               for k in range(4)])
        present = np.array([k in groups for k in range(4)])
        adjust = np.where(counts > 0, 2.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
        q = q * np.exp(np.where(present, 0.5 * (group_loss + adjust), 0.0))
        q = q / q.sum()
        np.testing.assert_allclose(algo.q.numpy(), q, rtol=1e-6)
        assert loss.item() == pytest.approx(float(q @ group_loss), rel=1e-5)
        loss.backward()  # the objective carries a gradient to the logits
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert algo.q[2] == 0 and algo.summary()["q"][2] == 0
    # the state travels through a checkpoint exactly
    other = GroupDRO(t, g=np.zeros(3), counts=counts)
    other.load_state_dict(algo.state_dict())
    assert torch.equal(other.q, algo.q)


def test_resampled_group_frequencies_match_inverse_counts():
    """Drawing with probability ∝ 1/n_g makes every populated group equally frequent: over
    20 epochs of 2,000 draws the group shares are 1/3 within 4 binomial standard errors."""
    counts = np.array([1500, 80, 0, 420])
    g = np.repeat(np.arange(4), counts)
    draws = np.concatenate([balanced_draw(g, counts, seed=3, epoch=e) for e in range(20)])
    assert len(draws) == 20 * len(g)
    shares = np.bincount(g[draws], minlength=4) / len(draws)
    se = np.sqrt((1 / 3) * (2 / 3) / len(draws))
    np.testing.assert_allclose(shares[[0, 1, 3]], 1 / 3, atol=4 * se)
    assert shares[2] == 0
    # seeded by (seed, epoch): the same draw after a resume, another one next epoch
    assert balanced_draw(g, counts, 3, 5) == balanced_draw(g, counts, 3, 5)
    assert balanced_draw(g, counts, 3, 5) != balanced_draw(g, counts, 3, 6)


def test_reweighting_is_inverse_count_normalised_to_the_number_of_groups():
    counts = np.array([300, 10, 0, 90])
    w = inverse_count_weights(counts)
    assert w[2] == 0 and w.sum() == pytest.approx(3.0)
    assert w[1] / w[0] == pytest.approx(30.0) and w[3] / w[0] == pytest.approx(300 / 90)
    algo = Reweight(TrainConfig(algorithm="reweight"), g=np.zeros(1), counts=counts)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y, g = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    assert algo.task_loss(logits, y, g).item() == pytest.approx(
        float((w[[0, 1, 3]] * ce).mean()), rel=1e-6)


def test_jtt_epoch_holds_every_image_once_and_each_error_image_lambda_more_times():
    t = TrainConfig(algorithm="jtt", jtt_epochs=1, jtt_upweight=5, seed=2)
    algo = make_algorithm(t, np.zeros(10, dtype=int), np.array([10]), error_set=lambda: [7, 3])
    order = algo.epoch_order(0)
    assert len(order) == algo.epoch_length() == 10 + 5 * 2
    visits = np.bincount(order, minlength=10)
    assert visits[3] == visits[7] == 6 and (np.delete(visits, [3, 7]) == 1).all()
    assert algo.epoch_order(0) == order and algo.epoch_order(1) != order


@pytest.mark.parametrize(("change", "message"), [
    ({"algorithm": "dro"}, "unknown algorithm 'dro'"),
    ({"algorithm": "dfr"}, "python -m robustbench_fvae.dfr"),
    ({"groupdro_eta": 0.0}, "groupdro_eta must be a positive number"),
    ({"groupdro_adjustment": -1.0}, "groupdro_adjustment must be >= 0"),
    ({"groupdro_sampler": "uniform"}, "unknown groupdro_sampler"),
    ({"algorithm": "jtt", "jtt_epochs": 0, "jtt_upweight": 5}, "jtt_epochs must be >= 1"),
])
def test_bad_algorithm_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_algorithm(TrainConfig(**change))


# ---------------------------------------------------------------- early stopping and selection


def _random_history(rng: random.Random, n: int) -> list[dict]:
    # Few distinct values, so that ties in worst-group (and average) accuracy are frequent.
    return [{"epoch": e, "step": 10 * e,
             "val": {"worst_group_acc": rng.choice([0.0, 0.0, 0.2, 0.4, 0.5]),
                     "avg_acc": rng.choice([0.6, 0.7, 0.8])},
             "test": {"worst_group_acc": rng.random()}} for e in range(1, n + 1)]


def _single_rule_run(history: list[dict], rule: str, patience: int) -> dict:
    """What a run that stopped early on ``rule`` alone selects: feed it the history one epoch
    at a time, stop when that rule's patience is spent, select over what it saw."""
    seen: list[dict] = []
    for record in history:
        seen.append(record)
        if should_stop_early(seen, rule, patience):
            break
    return select_epoch(seen, rule)


def test_each_rule_selects_what_early_stopping_on_it_alone_would_have():
    rng = random.Random(0)
    checked = 0
    for _ in range(500):
        history = _random_history(rng, rng.randint(1, 14))
        patience = rng.randint(1, 4)
        # the run trains until every rule has stopped: its history is a prefix of the full one
        trained = []
        for record in history:
            trained.append(record)
            if should_stop_all(trained, patience):
                break
        for rule in ("val_wg", "val_avg"):
            assert select_epoch(trained, rule, patience) == _single_rule_run(history, rule,
                                                                             patience)
            checked += 1
    assert checked == 1000


def test_worst_group_ties_go_to_the_better_average_then_the_earliest_epoch():
    history = [{"epoch": 1, "step": 1, "val": {"worst_group_acc": 0.0, "avg_acc": 0.7}},
               {"epoch": 2, "step": 2, "val": {"worst_group_acc": 0.0, "avg_acc": 0.9}},
               {"epoch": 3, "step": 3, "val": {"worst_group_acc": 0.0, "avg_acc": 0.9}},
               {"epoch": 4, "step": 4, "val": {"worst_group_acc": 0.0, "avg_acc": 0.95}}]
    assert select_epoch(history, "val_wg")["epoch"] == 4
    # with patience 2, early stopping on val_wg stops after epoch 3 (no strict WG improvement)
    assert stopping_epoch(history, "val_wg", 2) == 3
    assert select_epoch(history, "val_wg", patience=2)["epoch"] == 2
    assert select_epoch(history, "val_avg", patience=2)["epoch"] == 4
    assert not should_stop_all(history, 2)  # val_avg improved at epoch 4: keep training
