"""Speedup over AdamW (spec §5) against values computed by hand from the definition."""

import math

import pytest

from fastoptim.grid.speedup import compute_speedups, read_loss_csv

# AdamW's laws from the spec's table: size → (α, B, β).
LAWS = {"130m": (0.417, 0.495, 3.112), "300m": (0.350, 0.478, 2.913)}


def adamw_rows():
    return [("adamw", size, ratio, a * ratio ** -b + c) for size, (a, b, c) in LAWS.items() for ratio in (1, 2, 4, 8)]


def test_speedup_against_hand_computed_values():
    # Muon at 130M, 2×: loss 3.37. By hand: D_eff = ((3.37 − 3.112)/0.417)^(−1/0.495).
    d_eff = ((3.37 - 3.112) / 0.417) ** (-1 / 0.495)
    # Soap at 300M, 8×: loss 3.02.
    d_eff_soap = ((3.02 - 2.913) / 0.350) ** (-1 / 0.478)
    rows = adamw_rows() + [("muon", "130m", 2, 3.37), ("soap", "300m", 8, 3.02), ("lion", "130m", 1, 3.0)]
    table = compute_speedups(rows)

    assert set(table.laws) == {"130m", "300m"} and not table.failed_fits
    for size, (a, b, c) in LAWS.items():
        law = table.laws[size]
        assert (law.alpha, law.B, law.beta) == pytest.approx((a, b, c), rel=1e-5)
    by_key = {(r.optimizer, r.size, r.ratio): r for r in table.rows}
    assert by_key[("muon", "130m", 2.0)].effective_ratio == pytest.approx(d_eff, rel=1e-4)
    assert by_key[("muon", "130m", 2.0)].speedup == pytest.approx(d_eff / 2, rel=1e-4)
    assert by_key[("soap", "300m", 8.0)].speedup == pytest.approx(d_eff_soap / 8, rel=1e-4)
    assert math.isinf(by_key[("lion", "130m", 1.0)].speedup)  # below the law's asymptote β: infinitely many tokens
    for ratio in (1, 2, 4, 8):  # AdamW against its own law: 1 by construction
        assert by_key[("adamw", "130m", float(ratio))].speedup == pytest.approx(1.0, rel=1e-5)


def test_keeps_the_best_of_repeated_rows_and_reports_unfittable_sizes():
    rows = adamw_rows() + [("muon", "130m", 4, 3.40), ("muon", "130m", 4, 3.30), ("adamw", "1.2b", 1, 2.9),
                           ("adamw", "1.2b", 2, 2.8)]
    table = compute_speedups(rows)
    muon = [r for r in table.rows if r.optimizer == "muon"]
    assert len(muon) == 1 and muon[0].loss == 3.30
    assert "1.2b" in table.failed_fits and "3 distinct ratios" in table.failed_fits["1.2b"]
    assert all(r.size != "1.2b" for r in table.rows)


def test_csv_a_user_brings(tmp_path):
    path = tmp_path / "losses.csv"
    lines = ["optimizer,size,ratio,loss,notes"] + [f"{o},{s},{r},{l!r},x" for o, s, r, l in adamw_rows()]
    lines.append("muon,130m,2,3.37,ours")
    path.write_text("\n".join(lines) + "\n")
    rows = read_loss_csv(path)
    assert len(rows) == 9
    table = compute_speedups(rows)
    muon = next(r for r in table.rows if r.optimizer == "muon")
    assert muon.speedup == pytest.approx(((3.37 - 3.112) / 0.417) ** (-1 / 0.495) / 2, rel=1e-4)

    bad = tmp_path / "bad.csv"
    bad.write_text("optimizer,size,loss\nadamw,130m,3.5\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ratio'\]"):
        read_loss_csv(bad)
    bad.write_text("optimizer,size,ratio,loss\nadamw,130m,one,3.5\n")
    with pytest.raises(ValueError, match=":2: ratio, loss and seed_losses must be numbers"):
        read_loss_csv(bad)
