"""The paper's evaluation protocol without a model: prompt files, seeds, the Table 1 shape, win rates.

Facts checked: Pick-a-Pic parquet captions and PartiPrompts TSV prompts are read unique and in file
order; the bootstrap win rate equals the closed-form fraction and its interval holds it, is
reproducible under a seed and narrows with more prompts; ties count half; run_protocol gives prompt i
seed + i in every model and step count whatever the batch size; the table has the paper's columns in
its order, the CLIP score as the cosine, and one row per dataset, model and step count.
"""

from __future__ import annotations

import csv
import io

import pytest
import torch

from pso import eval_protocol as ep


def test_prompt_files_are_read_unique_in_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"caption": ["a fox", "a cat", "a fox", " ", "a boat"], "jpg_0": [b"x"] * 5}),
                   str(tmp_path / "test-00000-of-00001.parquet"))
    assert ep.read_prompts(tmp_path / "test-00000-of-00001.parquet") == ["a fox", "a cat", "a boat"]
    assert ep.read_prompts(tmp_path / "test-00000-of-00001.parquet", limit=2) == ["a fox", "a cat"]
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
                                               "a red cube\tArtifacts\tColors\tnote\n", encoding="utf-8")
    assert ep.read_prompts(tmp_path / "PartiPrompts.tsv") == ["bond", "a red cube"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\none\n", encoding="utf-8")
    assert ep.read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.tsv").write_text("Text2\tx\nfoo\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv has no prompt column.*'Prompt'.*\['Text2', 'x'\]"):
        ep.read_prompts(tmp_path / "bad.tsv")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ep.read_prompts(tmp_path / "missing.parquet")


def test_win_rate_is_the_fraction_of_wins_with_ties_half_and_a_reproducible_interval():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    b = torch.tensor([0.0, 3.0, 2.0, 4.0, 1.0, 9.0, 6.0, 7.0])   # A wins 5, tie 1, loses 2
    c = ep.paired_comparison(a, b, n_boot=4000, seed=1)
    assert (c.wins, c.ties, c.losses, c.n) == (5, 1, 2, 8)
    assert c.win_rate == pytest.approx(5.5 / 8) and c.mean_diff == pytest.approx(float((a - b).mean()))
    assert c.low < c.win_rate < c.high and c.low >= 0 and c.high <= 1
    assert ep.paired_comparison(a, b, n_boot=4000, seed=1) == c
    g = torch.Generator().manual_seed(0)
    big_a, big_b = torch.randn(800, generator=g) + 0.2, torch.randn(800, generator=g)
    wide, narrow = ep.paired_comparison(big_a[:50], big_b[:50]), ep.paired_comparison(big_a, big_b)
    assert narrow.high - narrow.low < (wide.high - wide.low) * 0.5
    assert narrow.low > 0.5, "a 0.2-sd shift over 800 prompts is a clear win"
    same = ep.paired_comparison(a, a)
    assert same.win_rate == 0.5 and same.low == same.high == 0.5
    with pytest.raises(ValueError, match="equal-length"):
        ep.paired_comparison(a, b[:3])


class _MeanReward:
    """Scores an image by its mean brightness (a real, if simple, reward for protocol tests)."""

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _sampler(calls):
    def sample(model, prompts, seeds, steps):
        calls.append((model, tuple(prompts), tuple(seeds), steps))
        shift = {"base": 0.0, "lora": 0.1}[model]
        return torch.stack([torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(s)) * 0.8 + shift
                            + 0.001 * steps for s in seeds])

    return sample


def test_prompt_i_gets_seed_plus_i_everywhere_and_batching_changes_nothing():
    sets = {"pickapic_test": ["a", "b", "c", "d", "e"], "parti": ["x", "y"]}
    calls: list = []
    one = ep.run_protocol(["base", "lora"], sets, [1, 4], {"aesthetic": _MeanReward()}, _sampler(calls),
                          seed=10, batch_size=1)
    assert all(seeds == tuple(10 + sets[next(k for k, v in sets.items() if p[0] in v)].index(p[0])
                              for p in [prompts]) for _, prompts, seeds, _ in calls)
    three = ep.run_protocol(["base", "lora"], sets, [1, 4], {"aesthetic": _MeanReward()}, _sampler([]),
                            seed=10, batch_size=3)
    for name in sets:
        for key, s in one[name].scores.items():
            torch.testing.assert_close(three[name].scores[key], s)
    rows = ep.comparisons(one, "lora", "base", n_boot=500)
    assert [(d, n) for d, n, _, _ in rows] == [("pickapic_test", 1), ("pickapic_test", 4), ("parti", 1),
                                               ("parti", 4)]
    assert all(c.win_rate == 1.0 for *_, c in rows), "the LoRA is brighter on every seed"


def test_table_has_the_papers_columns_order_and_clip_score_as_cosine():
    res = ep.EvalScores()
    for kind, val in (("aesthetic", 6.0), ("clip_score", 37.13), ("pickscore", 22.3), ("image_reward", 0.85)):
        res.add("base", 4, kind, torch.tensor([val, val]))
    md = ep.table1_markdown({"Pickapic Test": res, "Parti-Prompts": res})
    lines = md.splitlines()
    assert lines[0] == ("| Dataset | Method | Inference Steps | PickScore | CLIP Score | ImageReward | "
                        "Aesthetic Score |")
    assert lines[2] == "| Pickapic Test | base | 4 | 22.30 | 0.3713 | 0.8500 | 6.000 |"
    assert lines[3].startswith("| Parti-Prompts | base | 4 |") and len(lines) == 4
    rows = list(csv.reader(io.StringIO(ep.table1_csv({"Pickapic Test": res}))))
    assert rows[0][3:7] == ["PickScore", "CLIP Score", "ImageReward", "Aesthetic Score"]
    assert float(rows[1][4]) == pytest.approx(0.3713) and rows[1][-1] == "2"
