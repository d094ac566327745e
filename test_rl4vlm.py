"""Tests for the RL4VLM reference implementation: run `python -m pytest -q test_rl4vlm.py`.

Everything runs on a CPU with nothing downloaded: the environments, and a tiny LLaVA-architecture
model built from configs by rl4vlm.py, and a tiny copy of each other supported VLM family. The whole
file takes a few minutes on two cores.
"""
import collections
import copy
import json
import math
import os
import pickle
import random
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
import rl4vlm as R
from tools import tiny as tiny_models


# --- environments (envs.py)

def play(env, *names):
    """Step by action names; returns the list of (reward, terminated, truncated, info)."""
    out = []
    for name in names:
        _, reward, terminated, truncated, info = env.step(env.action_names.index(name))
        out.append((reward, terminated, truncated, info))
    return out


def expert_success(task, seeds):
    env, wins = envs.make(task, image_size=56), 0
    for seed in seeds:
        env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.expert_action())
            total, done = total + reward, terminated or truncated
        wins += total > 0
    return 100 * wins / len(seeds)


def assert_frequencies(samples, expected):
    """Each outcome's share of `samples` is within 4 standard errors of its probability in `expected`
    (a dict that sums to 1), and no other outcome occurs."""
    n, counts = len(samples), {}
    for x in samples:
        counts[x] = counts.get(x, 0) + 1
    assert abs(sum(expected.values()) - 1) < 1e-12 and set(counts) <= set(expected), set(counts) - set(expected)
    for x, p in expected.items():
        assert abs(counts.get(x, 0) / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (x, counts.get(x, 0) / n, p)


def test_registry_and_make():
    assert list(envs.TASKS) == ["numberline", "ezpoints", "points24", "blackjack"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when an id is registered twice
        runpy.run_path(envs.__file__, run_name="envs")  # a second import
    assert envs.env_id("numberline") == "rl4vlm/NumberLine-v0" and envs.TASKS["points24"] is envs.Points24Env
    for task in envs.TASKS:
        env, env_id = envs.make(task), envs.env_id(task)
        assert env.unwrapped is env and env.spec.id == env_id
        assert env.action_space == gym.spaces.Discrete(len(env.action_names))
        assert type(gym.make(env_id).unwrapped) is type(env)
    assert envs.make("blackjack").action_names == ["stand", "hit"]
    assert envs.make("points24").action_names[10:] == ["+", "-", "*", "/", "(", ")", "="]
    with pytest.raises(ValueError, match="unknown task 'x'; choose from numberline, ezpoints, points24, blackjack"):
        envs.make("x")


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_check_env_and_observations(task):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(envs.make(task))
        check_env(gym.make(envs.env_id(task), render_mode="rgb_array"))
    env = envs.make(task, image_size=84, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert obs.std() > 10  # not a blank image
    obs[:] = 0  # the caller's copy: must not change the env's image
    obs2, *_ = env.step(env.expert_action())
    assert np.array_equal(env.render(), obs2) and env.render().any()


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_invalid_action_raises(task):
    env = envs.make(task)
    env.reset(seed=0)
    for bad in (-1, len(env.action_names), 1.0, "0", None, True):
        with pytest.raises(ValueError, match="invalid action"):
            env.step(bad)
    env.step(np.int64(0))  # numpy integers are fine


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_seeding_reproduces_deal_and_images(task):
    env = envs.make(task)
    obs1, info1 = env.reset(seed=7)
    step1 = env.step(1)
    obs2, info2 = env.reset(seed=7)
    step2 = env.step(1)
    assert info1 == info2 and np.array_equal(obs1, obs2)
    assert np.array_equal(step1[0], step2[0]) and step1[1:] == step2[1:]
    deals = {str(env.reset(seed=s)[1]) for s in range(20)}
    assert len(deals) > 5  # different seeds give different deals


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_a_pickled_env_plays_on_and_leaves_its_spaces_behind(task):
    """A checkpoint pickles the environments: the copy plays on exactly as the original, and the pickle
    holds the state and its images (a formula game keeps its table's too), not the observation space, which
    alone pickles to four times an image's size."""
    env = envs.make(task)
    env.reset(seed=3)
    data = pickle.dumps(env)
    twin = pickle.loads(data)
    assert len(data) < 3 * env.render().nbytes
    assert twin.observation_space == env.observation_space and twin.action_space == env.action_space
    for a in (0, 1, 0):
        here, there = env.step(a), twin.step(a)
        assert np.array_equal(here[0], there[0]) and here[1:] == there[1:]
        if here[2] or here[3]:
            break


@pytest.mark.parametrize("task, bad", [
    ("numberline", {"target": 2, "current": 2}), ("numberline", {"target": 6, "current": 1}),
    ("numberline", {"target": 2}), ("ezpoints", {"cards": ["2"]}), ("ezpoints", {"cards": ["2", "1"]}),
    ("points24", {"cards": ["A", "5", "J"]}), ("points24", {"cards": "A5J8"}),
    ("blackjack", {"player": ["A", "7"], "dealer": ["10"]}), ("blackjack", {"player": ["K", "Q", "5"], "dealer": ["2", "3"]}),
    ("blackjack", {"player": ["A", "7"], "dealer": ["10", "6"], "seat": 1}),
])
def test_invalid_options_raise(task, bad):
    with pytest.raises(ValueError):
        envs.make(task).reset(seed=0, options=bad)


def test_numberline_rules():
    env = envs.make("numberline")
    _, info = env.reset(options={"target": 3, "current": 1})
    assert info == {"target": 3, "current": 1}
    steps = play(env, "+", "-", "+", "+")
    assert [s[0] for s in steps] == [0.0, -1.0, 0.0, 1.0]  # closer, wrong way, closer, reached
    assert [s[1] for s in steps] == [False, False, False, True] and steps[-1][3]["current"] == 3
    env.reset(options={"target": 3, "current": 0})
    assert play(env, "-")[0][:2] == (-1.0, False) and env.current == 0  # bump at the wall
    env.reset(options={"target": 1, "current": 5})
    assert play(env, "+")[0][0] == -1.0 and env.current == 5
    env.reset(options={"target": 5, "current": 0})
    truncated = [s[2] for s in play(env, *["-"] * 10)]
    assert truncated == [False] * 9 + [True]  # truncated after 2 * max_position steps
    env = envs.make("numberline", max_position=3)
    env.reset(options={"target": 3, "current": 0})
    assert [s[2] for s in play(env, *["-"] * 6)] == [False] * 5 + [True]
    starts = [tuple(env.reset(seed=s)[1].values()) for s in range(20000)]
    assert all(t != c and 0 <= min(t, c) and max(t, c) <= 3 for t, c in starts)
    # the official start rule: every ordered (target, current) pair with target != current occurs,
    # (1, 0), (2, 1), (0, 2) and (1, 3) (the redrawn equal pairs) twice as often as the other eight
    expected = {(t, c): (2 if (t, c) in {(1, 0), (2, 1), (0, 2), (1, 3)} else 1) / 16
                for t in range(4) for c in range(4) if t != c}
    assert_frequencies(starts, expected)
    with pytest.raises(ValueError, match="max_position must be at least 2"):
        envs.make("numberline", max_position=1)  # (0 + 1) % 1 would start on the target


def test_numberline_images_show_the_state():
    env = envs.make("numberline", image_size=84)
    a, _ = env.reset(options={"target": 3, "current": 1})
    b, *_ = env.step(env.action_names.index("+"))
    c, _ = env.reset(options={"target": 4, "current": 1})
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("size", [112, 224, 336])
def test_points24_cards_sit_whole_eighths_apart(size):
    """A ViT whose patches tile eighths of the image cuts every Points24 card the same way, so a rank
    learned on one card is read on all four (a seventh of a patch off, the tiny model learned each
    column's digits separately). The cards' corners, found where the felt stops, are eighths apart."""
    img = envs.make("points24", image_size=size).reset(seed=3)[0].astype(int)
    card = np.abs(img - np.array(envs.FELT)).sum(axis=2) > 60  # (S, S): not the table

    def starts(line):  # where each run of card pixels begins
        return [i for i in range(1, len(line)) if line[i] and not line[i - 1]]
    xs, ys = starts(card[int(0.2 * size)]), starts(card[:, int(0.2 * size)])[:2]  # the top row; the left column
    assert len(xs) == 2 and len(ys) == 2
    assert (xs[1] - xs[0]) % (size // 8) == 0 and (ys[1] - ys[0]) % (size // 8) == 0, (xs, ys)


def test_ezpoints_rules():
    env = envs.make("ezpoints")
    _, info = env.reset(options={"cards": ["2", "K"]})
    assert info == {"cards": ["2", "K"], "numbers": [2, 10], "formula": ""}
    steps = play(env, "10", "+", "2", "=")
    assert [s[0] for s in steps] == [0.0, 0.0, 0.0, 10.0] and steps[-1][1] and steps[2][3]["formula"] == "10 + 2"
    env.reset(options={"cards": ["2", "K"]})
    assert [s[0] for s in play(env, "2", "*", "10", "=")] == [0, 0, 0, -1.0]  # 20, not 12
    env.reset(options={"cards": ["2", "K"]})
    steps = play(env, "5", "=")
    assert steps[0][:2] == (-1.0, False) and steps[0][3]["formula"] == "_"  # 5 is not on a card
    assert steps[1][:2] == (-1.0, True)
    env.reset(options={"cards": ["2", "K"]})
    steps = play(env, "2", "+", "2")
    assert steps[2][0] == -1.0 and steps[2][3]["formula"] == "2 + _"  # only one 2
    env.reset(options={"cards": ["6", "6"]})
    assert [s[0] for s in play(env, "6", "+", "6", "=")] == [0, 0, 0, 10.0]  # two 6s: both usable
    env.reset(options={"cards": ["2", "K"]})
    assert [s[0] for s in play(env, "10", "=")] == [0, -1.0]  # must use both cards
    # blanks count toward the length but "=" skips them: 5 units are still judged...
    env.reset(options={"cards": ["2", "6"]})
    steps = play(env, "2", "5", "5", "*", "6", "=")
    assert [s[0] for s in steps] == [0, -1.0, -1.0, 0, 0, 10.0] and steps[-2][3]["formula"] == "2 _ _ * 6"
    assert [s[1] for s in steps] == [False] * 5 + [True]
    # ...but once the formula holds more than 5 units the next step, whatever it is, loses (-1)
    env.reset(options={"cards": ["2", "6"]})
    steps = play(env, "2", "5", "5", "5", "*", "6", "=")
    assert [s[0] for s in steps] == [0, -1.0, -1.0, -1.0, 0, 0, -1.0] and steps[-1][3]["formula"] == "2 _ _ _ * 6"
    assert [s[1:3] for s in steps] == [(False, False)] * 6 + [(True, False)]  # terminated, not truncated
    env.reset(options={"cards": ["2", "K"]})
    steps = play(env, *["+"] * 7)
    assert [s[:3] for s in steps] == [(0.0, False, False)] * 6 + [(-1.0, True, False)]
    assert steps[-1][3]["formula"] == "+ + + + + +"  # the 7th "+" is not written


def test_ezpoints_deals_always_make_12():
    env = envs.make("ezpoints", image_size=56)
    seen = set()
    for seed in range(400):
        info = env.reset(seed=seed)[1]
        (a, b), ranks = info["numbers"], info["cards"]
        assert a + b == 12 or a * b == 12
        if set(ranks) & {"J", "Q", "K"}:  # a face card is always the first card, so its partner is a 2
            assert sorted(ranks)[0] == "2"
        seen.update(ranks)
    assert seen == {"2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"}  # never an A


def official_ezpoints_deal_probabilities():
    """{(left rank, right rank): probability} of the official EZPoints deal: the first rank uniform
    over 2..K (J, Q, K count 10); the second card's value is 12 // v with probability 1/2 when v is
    2, 3, 4 or 6, else 12 - v, shown as that plain number; then a swap with probability 1/2."""
    probs = {}
    for first in ["2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]:
        v = 10 if first in "JQK" else int(first)
        seconds = [(12 // v, 0.5), (12 - v, 0.5)] if v in (2, 3, 4, 6) else [(12 - v, 1.0)]
        for value, q in seconds:
            for pair in ((first, str(value)), (str(value), first)):  # kept or swapped
                probs[pair] = probs.get(pair, 0.0) + q * 0.5 / 12
    return probs


def test_ezpoints_deals_follow_the_official_distribution():
    env = envs.make("ezpoints", image_size=56)
    deals = [tuple(env.reset(seed=s)[1]["cards"]) for s in range(20000)]
    expected = official_ezpoints_deal_probabilities()
    assert len(expected) == 19 and expected[("J", "2")] == expected[("2", "J")] == 1 / 24
    assert_frequencies(deals, expected)  # ordered rank pairs, so the value pairs follow too
    values = {}
    for (a, b), p in expected.items():
        key = (envs.VALUE[a], envs.VALUE[b])
        values[key] = values.get(key, 0.0) + p
    assert abs(values[(10, 2)] - (1 / 6 + 1 / 48)) < 1e-12 and abs(values[(6, 6)] - 1 / 24) < 1e-12
    assert_frequencies([tuple(envs.VALUE[r] for r in d) for d in deals], values)


@pytest.mark.parametrize("max_position", [2, 5, 9])
def test_numberline_starts_follow_the_official_distribution(max_position):
    """Official start: current and target uniform over 0..max_position, then an equal target
    becomes (target + 1) % max_position."""
    m, expected = max_position, {}
    for current in range(m + 1):
        for target in range(m + 1):
            pair = (target if target != current else (target + 1) % m, current)
            expected[pair] = expected.get(pair, 0.0) + 1 / (m + 1) ** 2
    assert len(expected) == m * (m + 1) and all(t != c for t, c in expected)
    env = envs.make("numberline", image_size=56, max_position=m)
    starts = [(i["target"], i["current"]) for i in (env.reset(seed=s)[1] for s in range(20000))]
    assert_frequencies(starts, expected)


def test_evaluate_is_exact_and_safe():
    ev = lambda s: envs.evaluate(s.split())
    assert ev("8 / ( 3 - 8 / 3 )") == 24 and ev("2 + 3 * 4") == 14 and ev("( 2 + 3 ) * 4") == 20
    assert ev("10 - 4 - 3") == 3 and ev("8 / 4 / 2") == 1 and ev("1 / 3 * 3") == 1
    assert ev("2 _ * 6") == 12 and ev("_ ( 8 / _ 2 ) _") == 4  # blanks are skipped
    for bad in ("", "3 8", "( 1 + 2", "1 + 2 )", "1 +", "- 3", "4 / ( 2 - 2 )", "_ + 1", "( )",
                "2 _ 10", "_", "2 * * 3", "8 / / 3", "3 - - 3"):  # a blank never joins two numbers
        assert ev(bad) is None, bad


def test_points24_rules():
    env = envs.make("points24")
    env.reset(options={"cards": ["8", "3", "8", "3"]})
    steps = play(env, *"8 / ( 3 - 8 / 3 ) =".split())
    assert [s[0] for s in steps] == [0.0] * 9 + [10.0] and steps[-1][1]
    env.reset(options={"cards": ["4", "2", "2", "5"]})
    assert play(env, *"4 / ( 2 - 2 ) * 5 =".split())[-1][:2] == (-1.0, True)  # division by zero
    env.reset(options={"cards": ["4", "2", "2", "5"]})
    assert play(env, "(", "=")[-1][:2] == (-1.0, True)  # malformed
    env.reset(options={"cards": ["8", "3", "A", "A"]})
    assert play(env, "8", "*", "3", "=")[-1][:2] == (-1.0, True)  # 24, but not with all four cards
    env.reset(options={"cards": ["2", "4", "3", "3"]})
    assert play(env, *"2 4 * 3 / 3 =".split())[-1][0] == -1.0  # "2 4" is not 24
    _, info = env.reset(options={"cards": ["A", "5", "J", "8"]})
    assert info["numbers"] == [1, 5, 10, 8]
    steps = play(env, "2", "10", "10", "1")
    assert [s[0] for s in steps] == [-1.0, 0.0, -1.0, 0.0] and steps[-1][3]["formula"] == "_ 10 _ 1"
    env.reset(options={"cards": ["2", "4", "3", "3"]})
    assert play(env, *"2 5 4 * 3 / 3 =".split())[-1][0] == -1.0  # "2 _ 4": the blank does not join them
    # blanks are skipped by "=": with 11 of them the formula has 20 units and still wins; with 12 it
    # has 21, more than 20, and the "=" loses
    for blanks, reward in ((11, 10.0), (12, -1.0)):
        env.reset(options={"cards": ["8", "3", "8", "3"]})
        steps = play(env, *["5"] * blanks, *"8 / ( 3 - 8 / 3 ) =".split())
        assert [s[0] for s in steps] == [-1.0] * blanks + [0.0] * 9 + [reward]
        assert [s[1:3] for s in steps] == [(False, False)] * (blanks + 9) + [(True, False)]
    env.reset(options={"cards": ["A", "5", "J", "8"]})
    steps = play(env, *["("] * 22)
    assert [s[:3] for s in steps] == [(0.0, False, False)] * 21 + [(-1.0, True, False)]  # past 20 units
    assert steps[-1][3]["formula"] == " ".join(["("] * 21)


def test_formula_experts():
    env = envs.make("points24")
    env.reset(options={"cards": ["8", "3", "8", "3"]})
    written = []
    while not written or written[-1] != "=":
        written.append(env.action_names[env.expert_action()])
        env.step(env.action_names.index(written[-1]))
    assert written == "8 / ( 3 - 8 / 3 ) =".split()
    env.reset(options={"cards": ["8", "3", "8", "3"]})
    play(env, "3")  # no solution starts with 3: give up at once
    assert env.action_names[env.expert_action()] == "="
    env.reset(options={"cards": ["A", "A", "A", "A"]})  # unsolvable
    assert env.action_names[env.expert_action()] == "="
    assert envs.solve((3, 3, 8, 8), 24) == (tuple("8 / ( 3 - 8 / 3 )".split()),)
    # blanks are skipped: after "5" (not on a card) and "8" (a blank in between) the expert goes on
    env.reset(options={"cards": ["8", "3", "8", "3"]})
    rewards = [s[0] for s in play(env, "5", "8", "5")]
    while True:
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        rewards.append(reward)
        if terminated or truncated:
            break
    assert rewards == [-1.0, 0.0, -1.0] + [0.0] * 8 + [10.0] and info["formula"] == "_ 8 _ / ( 3 - 8 / 3 )"
    solution = tuple("8 / ( 3 - 8 / 3 )".split())
    assert envs.continue_solution([8, 3, 8, 3], ["_", "8", "_", "/"], 24, "+-*/()") == solution
    assert envs.continue_solution([2, 6], ["2", "_", "6"], 12, "+*") is None  # "2 _ 6" is not "2 6" joined


def test_blackjack_rules():
    env = envs.make("blackjack")
    _, info = env.reset(seed=0, options={"player": ["A", "7"], "dealer": ["10", "6"]})
    assert info == {"player_cards": ["A", "7"], "player_total": 18, "usable_ace": True, "dealer_card": "10"}
    for player, dealer, reward in [(["10", "K"], ["10", "7"], 1.0), (["10", "6"], ["10", "8"], -1.0),
                                   (["10", "8"], ["J", "8"], 0.0), (["10", "8"], ["A", "6"], 1.0)]:  # soft 17 stands
        env.reset(seed=0, options={"player": player, "dealer": dealer})
        r, terminated, truncated, info = play(env, "stand")[0]
        assert (r, terminated, truncated) == (reward, True, False) and info["dealer_cards"] == dealer
    outcomes = set()
    for seed in range(200):
        env.reset(seed=seed, options={"player": ["10", "9"], "dealer": ["10", "2"]})
        r, terminated, _, info = play(env, "stand")[0]
        assert terminated and len(info["dealer_cards"]) >= 3 and info["dealer_total"] >= 17  # draws to 17
        d = info["dealer_total"]
        assert r == (1.0 if d > 21 or d < 19 else 0.0 if d == 19 else -1.0)
        outcomes.add(r)
        env.reset(seed=seed, options={"player": ["A", "5"], "dealer": ["10", "2"]})
        assert play(env, "hit")[0][:2] == (0.0, False)  # soft 16 never busts
        env.reset(seed=seed, options={"player": ["10", "Q"], "dealer": ["10", "2"]})
        r, terminated, _, info = play(env, "hit")[0]
        ace = info["player_cards"][2] == "A"
        assert (r, terminated, info["player_total"]) == ((0.0, False, 21) if ace else (-1.0, True, info["player_total"]))
        assert ace or info["player_total"] > 21
        outcomes.add(("hit", ace))
    assert outcomes == {1.0, 0.0, -1.0, ("hit", True), ("hit", False)}


def test_blackjack_hidden_card():
    env = envs.make("blackjack", image_size=112)
    a, info = env.reset(seed=1, options={"player": ["9", "7"], "dealer": ["10", "6"]})
    b, _ = env.reset(seed=1, options={"player": ["9", "7"], "dealer": ["10", "K"]})
    assert np.array_equal(a, b) and "dealer_cards" not in info  # face down: the images match
    c, _ = env.reset(seed=1, options={"player": ["9", "7"], "dealer": ["9", "K"]})
    assert not np.array_equal(a, c)  # the up-card shows
    end_a = play(env, "stand")[0][3]
    assert end_a["dealer_cards"][:2] == ["9", "K"] and not np.array_equal(env.render(), c)  # revealed


def test_blackjack_dp_policy():
    hit = lambda total, up, soft=False: envs.blackjack_values(total - 10 * soft, soft, up)[1] > \
        envs.blackjack_values(total - 10 * soft, soft, up)[0]
    assert all(not hit(t, up) for t in range(17, 22) for up in range(1, 11))  # stand on hard 17+
    assert all(hit(t, up) for t in range(4, 12) for up in range(1, 11))  # can't bust: hit
    assert [hit(12, up) for up in range(2, 11)] == [True, True, False, False, False, True, True, True, True]
    assert hit(16, 10) and not hit(13, 2) and hit(18, 9, soft=True) and not hit(18, 7, soft=True)
    expected = sum(p1 * p2 * pu * max(envs.blackjack_values(v1 + v2, 1 in (v1, v2), up))
                   for v1, p1 in envs.DRAW for v2, p2 in envs.DRAW for up, pu in envs.DRAW)
    assert abs(expected - (-0.0466)) < 0.0005  # the optimal hit/stand return, infinite deck


def test_expert_success_rates():
    assert expert_success("numberline", range(200)) == 100
    assert expert_success("ezpoints", range(300)) == 100
    # Points24: the expert wins exactly the solvable deals, 73.1% of all (std. error ~1% here)
    env = envs.make("points24", image_size=56)
    solvable = [bool(envs.solve(tuple(sorted(env.reset(seed=s)[1]["numbers"])), 24)) for s in range(2000)]
    rate = expert_success("points24", range(2000))
    assert rate == 100 * sum(solvable) / 2000 and 70.6 < rate < 75.6
    # Blackjack: 42.95% for the optimal policy (std. error 0.5% over 10000 hands; 40% is excluded)
    assert 41.45 < expert_success("blackjack", range(10000)) < 44.45


def test_blackjack_threshold_baselines_match_play():
    """tools/baselines.py's exact win rate of "hit below N" (the README's dealer-blind bound) agrees
    with playing that policy in the env (standard error 0.5% over 10000 hands)."""
    b = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "baselines.py"))
    for n in (14, 17):
        exact = 100 * b["exact_win_rate"](b["blind_hits"](n))
        played = 100 * b["success_rate"]("blackjack", b["hit_below"](n), 10000)
        assert abs(exact - played) < 2.0, (n, exact, played)
        assert exact < 43.16  # the best win rate any policy can reach on the infinite deck
    expert = 100 * b["exact_win_rate"](envs.blackjack_expert_hits)  # the expert's exact rate: the README's 42.95
    played = 100 * b["success_rate"]("blackjack", "expert", 10000)
    assert abs(expert - played) < 2.0 and 42.9 < expert < 43.16, (expert, played)
    for soft in (True, False):  # the expert with one kind of hand played dealer-blind loses, but less than all
        blind = 100 * b["exact_win_rate"](b["blind_hits"](14))
        assert blind < 100 * b["exact_win_rate"](b["expert_except"](14, soft)) < expert


def test_episode_seeds_never_collide():
    """Training (SFT, rollouts) never plays an evaluation or probe episode, for any --seed: each use and
    run seed has its own range (--seed 10 used to give seed 10 * 100,000 + i = 1,000,000 + i)."""
    seeds = [envs.episode_seed(use, i, run_seed) for use in envs.SEED_USES for run_seed in range(300)
             for i in (0, 1, 7, 199, 1999, 100_000, 2**32 - 1)]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= 0
    evaluation = {envs.episode_seed("evaluation", j) for j in range(5000)}
    for run_seed in range(300):
        training = {envs.episode_seed(use, i, run_seed) for use in ("sft", "rollout") for i in range(64)}
        assert not training & evaluation
    for bad in [(-1, 0), (0, -1), (2**32, 0)]:
        with pytest.raises(ValueError):
            envs.episode_seed("sft", *bad)


# The official gym_cards rules (github.com/RL4VLM/RL4VLM, gym-cards/gym_cards/envs/*.py), restated as
# plain functions. They are fed the deals and draws of our envs (the official ones use other random
# streams), and test_rules_match_the_official_gym_cards checks that every step scores the same.


def official_formula_step(state, name, numbers, target, max_len, exact=False):
    """One official EZPoints (max_len 5) / Points24 (max_len 20) step. state: {"formula": [...],
    "used": [...]}, changed in place; numbers: the card values. -> (reward, terminated, truncated).
    exact=True evaluates the same Python expression with every number a Fraction (not official)."""
    formula, used = state["formula"], state["used"]
    if len(formula) > max_len:  # checked first, whatever the action
        return -1, False, True
    if name.isdigit():
        if any((used + [int(name)]).count(x) > numbers.count(x) for x in used + [int(name)]):
            formula.append(" ")  # not on an unused card: a blank
            return -1, False, False
        used.append(int(name))
    if name == "=":
        text = "".join(map(str, formula))
        if exact:
            text = re.sub(r"\d+", r"Fraction(\g<0>)", text)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "3(4)" warns at compile time, then raises TypeError
                reward = 10 if eval(text, {"Fraction": Fraction}) == target else -1
        except Exception:
            reward = -1
        if len(used) != len(numbers):
            reward = -1
        return reward, True, False
    formula.append(int(name) if name.isdigit() else name)
    return 0, False, False


def official_numberline_step(state, action, max_position):
    """state: {"position", "goal", "steps"}, changed in place; action 0 left, 1 right."""
    state["steps"] += 1
    before = abs(state["position"] - state["goal"])
    if action == 0 and state["position"] > 0:
        state["position"] -= 1
    elif action == 1 and state["position"] < max_position:
        state["position"] += 1
    after = abs(state["position"] - state["goal"])
    done = after == 0
    reward = 1 if done else -1 if after >= before else 0
    return reward, done, not done and state["steps"] >= max_position * 2


def official_sum_hand(values):
    return sum(values) + 10 if 1 in values and sum(values) + 10 <= 21 else sum(values)


def official_blackjack_step(action, player, dealer=None):
    """The official reward and end of a hit (action 1; `player` already holds the drawn card) or a
    stick (0; `dealer`: the dealer's final hand). Card values: A 1, J/Q/K 10."""
    if action == 1:
        return (-1.0, True) if official_sum_hand(player) > 21 else (0.0, False)
    score = [0 if official_sum_hand(h) > 21 else official_sum_hand(h) for h in (player, dealer)]
    return float(score[0] > score[1]) - float(score[0] < score[1]), True


def official_dealer_draws(dealer):
    """How many cards the official dealer ends with, drawing from `dealer` while below 17."""
    k = 2
    while official_sum_hand(dealer[:k]) < 17:
        k += 1
    return k


def declared_difference(formula):
    """Which declared difference of ours may change what the official "=" makes of `formula` (with its
    " " blanks): "**" or "//" (two operators read as one), "concatenation" (two numbers with no blank
    between), "unary sign"; None if Python reads it as our grammar does (or rejects it as we do)."""
    text = "".join(map(str, formula))
    for op in ("**", "//"):
        if op in text:
            return op
    if any(isinstance(a, int) and isinstance(b, int) for a, b in zip(formula, formula[1:])):
        return "concatenation"
    units = [str(u) for u in formula if u != " "]
    if any(u in "+-" and (i == 0 or units[i - 1] in ("+", "-", "*", "/", "(")) for i, u in enumerate(units)):
        return "unary sign"
    return None


FACE_VALUE = {"A": 1, "J": 10, "Q": 10, "K": 10}


def test_rules_match_the_official_gym_cards():
    """Thousands of episodes, their actions the expert's or uniformly random ones (mixed per episode),
    played in our envs and in the official rules above from the same deals and draws: the rewards
    and episode ends agree at every step, the official "truncated" at the length limit being our
    "terminated". The only exceptions allowed are "=" steps on formulas with a declared difference
    (envs.py's docstring): Python reads "**", "//", two numbers in a row or a unary sign, which our
    parser rejects (-1), or float arithmetic changes the result (we score the exact value)."""
    rng = random.Random(0)
    # formula games
    stats = {"episodes": 0, "steps": 0, "=": 0, 10: 0, -1: 0, "blank": 0, "blank win": 0, "too long": 0}
    seen = {"**": 0, "//": 0, "concatenation": 0, "unary sign": 0}  # "=" on such formulas
    differ = {"**": 0, "//": 0, "concatenation": 0, "unary sign": 0, "float": 0}  # ... scored differently
    for task, episodes in (("ezpoints", 4000), ("points24", 4000)):
        env = envs.make(task, image_size=56)
        max_len, target = env.max_units, env.target
        for seed in range(episodes):
            numbers = env.reset(seed=seed)[1]["numbers"]
            state, p_expert = {"formula": [], "used": []}, rng.choice([0.0, 0.5, 0.9])
            stats["episodes"] += 1
            while True:
                a = env.expert_action() if rng.random() < p_expert else rng.randrange(len(env.action_names))
                name, stats["steps"] = env.action_names[a], stats["steps"] + 1
                judged = name == "=" and len(state["formula"]) <= max_len  # "=" evaluates the formula
                kind = declared_difference(state["formula"]) if judged else None
                _, reward, terminated, truncated, info = env.step(a)
                assert truncated is False
                if kind:
                    seen[kind] += 1
                if kind == "**":  # not evaluated: "10**10**10" would never finish; we say -1
                    differ["**"] += 1
                    assert (reward, terminated) == (-1.0, True)
                    stats["="], stats[-1] = stats["="] + 1, stats[-1] + 1
                    break
                exact = official_formula_step(copy.deepcopy(state), name, numbers, target, max_len, exact=True)
                official = official_formula_step(state, name, numbers, target, max_len)
                assert terminated == (official[1] or official[2]), (task, seed, state, name)
                if reward != official[0]:  # allowed only on a declared difference
                    assert judged, (task, seed, state, name, reward, official)
                    if kind:  # Python reads what our parser rejects
                        assert reward == -1.0, (task, state, name)
                        differ[kind] += 1
                    else:  # float arithmetic: we score the exact value
                        assert reward == exact[0] != official[0], (task, state, name, reward, official)
                        differ["float"] += 1
                assert info["formula"].split() == ["_" if u == " " else str(u) for u in state["formula"]]
                stats["blank"] += reward == -1 and not terminated
                stats["too long"] += official[2]
                if judged:
                    stats["="], stats[reward] = stats["="] + 1, stats[reward] + 1
                    stats["blank win"] += reward == 10 and "_" in info["formula"]
                if terminated:
                    break
    print("formula games:", stats, "declared-difference formulas at '=':", seen, "scored differently:", differ)
    assert stats[10] > 1000 and stats[-1] > 1000 and stats["blank"] > 1000  # wins, losses, blanks
    assert stats["too long"] > 500 and stats["blank win"] > 50  # length ends; wins despite blanks
    assert sum(differ.values()) < 0.02 * stats["="]

    # NumberLine
    env, outcomes = envs.make("numberline", image_size=56), {}
    for seed in range(3000):
        info = env.reset(seed=seed)[1]
        state, p_expert = {"position": info["current"], "goal": info["target"], "steps": 0}, rng.choice([0.0, 0.5])
        while True:
            a = env.expert_action() if rng.random() < p_expert else rng.randrange(2)
            _, reward, terminated, truncated, info = env.step(a)
            assert (reward, terminated, truncated) == official_numberline_step(state, a, env.max_position)
            assert info["current"] == state["position"]
            outcomes[reward, truncated] = outcomes.get((reward, truncated), 0) + 1
            if terminated or truncated:
                break
    print("numberline (reward, truncated): steps", outcomes)
    assert all(outcomes.get(k, 0) > 100 for k in ((1.0, False), (0.0, False), (-1.0, False), (-1.0, True)))

    # Blackjack
    env, outcomes = envs.make("blackjack", image_size=56), {}
    value = lambda ranks: [FACE_VALUE.get(r) or int(r) for r in ranks]
    for seed in range(5000):
        env.reset(seed=seed)
        while True:
            a = env.expert_action() if rng.random() < 0.5 else rng.randrange(2)
            _, reward, terminated, truncated, info = env.step(a)
            dealer = value(info["dealer_cards"]) if a == 0 else None
            if a == 0:
                assert official_dealer_draws(dealer) == len(dealer)  # the dealer stopped where it would
            official = official_blackjack_step(a, value(info["player_cards"]), dealer)
            assert (reward, terminated, truncated) == (*official, False)
            outcomes[reward, a] = outcomes.get((reward, a), 0) + 1
            if terminated:
                break
    print("blackjack (reward, action): steps", outcomes)
    assert all(outcomes.get(k, 0) > 100 for k in ((1.0, 0), (0.0, 0), (-1.0, 0), (0.0, 1), (-1.0, 1)))


@pytest.mark.parametrize("task, cards, actions, official_reward, our_reward, kind", [
    ("points24", ["8", "3", "8", "3"], "8 / ( 3 - 8 / 3 ) =", -1, 10.0, None),  # float: 23.99999999999999
    ("points24", ["10", "10", "4", "A"], "10 * 10 / / 4 - 1 =", 10, -1.0, "//"),  # 100 // 4 - 1
    ("points24", ["A", "2", "2", "A"], "1 2 * 2 * 1 =", 10, -1.0, "concatenation"),  # 12 * 2 * 1
    ("points24", ["A", "2", "2", "A"], "1 5 2 * 2 * 1 =", -1, -1.0, None),  # "1 _ 2": no concatenation
    ("points24", ["2", "3", "3", "A"], "2 * * 3 * 3 * 1 =", 10, -1.0, "**"),  # 2 ** 3 * 3 * 1
    ("points24", ["A", "5", "5", "A"], "- 1 + 5 * 5 * 1 =", 10, -1.0, "unary sign"),
    ("ezpoints", ["2", "K"], "+ 2 + 10 =", 10, -1.0, "unary sign"),
    ("ezpoints", ["2", "6"], "5 2 * 5 6 =", 10, 10.0, None),  # " 2* 6": the blanks are skipped
])
def test_declared_differences_from_the_official_rules(task, cards, actions, official_reward, our_reward, kind):
    """Each declared difference, once: the official rules above and our env on the same formula."""
    env = envs.make(task, image_size=56)
    numbers = env.reset(options={"cards": cards})[1]["numbers"]
    state = {"formula": [], "used": []}
    for name in actions.split():
        if name == "=":
            assert declared_difference(state["formula"]) == kind
        official = official_formula_step(state, name, numbers, env.target, env.max_units)
        ours = play(env, name)[0]
    assert official == (official_reward, True, False) and ours[:3] == (our_reward, True, False)


# --- rl4vlm.py: arguments, prompts and action parsing

HERE = os.path.dirname(os.path.abspath(__file__))
READING, PROBES = os.path.join(HERE, "tools", "reading.py"), os.path.join(HERE, "dev", "reading.py")
P24 = envs.make("points24").action_names


def test_default_save_dirs_never_share_a_folder():
    """Runs that differ in task, CoT, seed, architecture or --load write to different folders by default,
    each named with its start time, so running another one never overwrites a saved run."""
    argvs = [[], ["--seed", "2"], ["--no-cot"], ["--task", "blackjack"], ["--tiny-arch", "qwen2.5-vl"],
             ["--tiny-arch", "gemma3", "--no-cot"], ["--load", "runs/numberline-s1/model"]]
    dirs = [R.parse_args(a).save_dir for a in argvs]
    assert len(set(dirs)) == len(dirs), dirs
    assert re.fullmatch(r"runs/numberline-s1-\d{8}-\d{6}", dirs[0].replace(os.sep, "/")), dirs[0]


def test_load_defaults_to_the_saved_task_and_format(tmp_path):
    """--load without --task goes on with the task and CoT setting the model was trained with (it ran
    NumberLine on a Points24 model); flags given on the command line still win. --load takes a run's
    folder or its model/."""
    (tmp_path / "rl4vlm.json").write_text(json.dumps({"task": "blackjack", "cot": False}))
    args = R.parse_args(["--load", str(tmp_path)])
    assert (args.task, args.no_cot) == ("blackjack", True)
    assert args.save_dir.startswith(os.path.join("runs", "blackjack-nocot-s1-load-"))
    assert R.parse_args(["--load", str(tmp_path), "--task", "ezpoints"]).task == "ezpoints"
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "rl4vlm.json").write_text(json.dumps({"task": "ezpoints", "cot": True}))
    args = R.parse_args(["--load", str(run)])
    assert args.load == str(run / "model") and args.task == "ezpoints"
    (tmp_path / "rl4vlm.json").write_text("{not json")  # unreadable: the defaults, and loading reports it
    assert (R.parse_args(["--load", str(tmp_path)]).task, R.parse_args([]).no_cot) == ("numberline", False)


# Table 1's recipes (docs/results.md): `python rl4vlm.py --task T` must run exactly these.
TABLE_1 = {
    "numberline": dict(sft_steps=1300, sft_batch_size=64, sft_expert_prob=0.25, sft_restart_prob=0.0, sft_warmup=0,
                       num_updates=100, num_envs=8, num_steps=16, lr=1e-4, kl_coef=1.0, eval_episodes=200,
                       eval_start_episodes=200, eval_envs=8),
    "ezpoints": dict(sft_steps=2000, sft_batch_size=32, sft_expert_prob=1.0, sft_restart_prob=0.5, sft_warmup=200,
                     num_updates=20, num_envs=8, num_steps=16, lr=1e-4, kl_coef=1.0, eval_episodes=200,
                     eval_start_episodes=200, eval_envs=8),
    "points24": dict(sft_steps=2500, sft_batch_size=64, sft_expert_prob=1.0, sft_restart_prob=0.5, sft_warmup=200,
                     num_updates=20, num_envs=16, num_steps=16, lr=3e-5, kl_coef=1.0, eval_episodes=200,
                     eval_start_episodes=200, eval_envs=8),
    "blackjack": dict(sft_steps=1300, sft_batch_size=32, sft_expert_prob=0.5, sft_restart_prob=0.0, sft_warmup=200,
                      num_updates=200, num_envs=16, num_steps=8, lr=1e-4, kl_coef=2.0, eval_episodes=10000,
                      eval_start_episodes=2000, eval_envs=96),
}


@pytest.mark.parametrize("task", list(TABLE_1))
def test_each_task_runs_its_table_1_recipe_by_default(task, tmp_path):
    args = R.parse_args(["--task", task])
    assert {k: getattr(args, k) for k in TABLE_1[task]} == TABLE_1[task]
    assert (args.temperature, args.thought_coef, args.gamma, args.gae_lambda, args.clip_coef) == (0.2, 0.5, 0.9, 0.95,
                                                                                                   0.1)  # the paper's
    given = R.parse_args(["--task", task, "--num-updates", "3", "--num-envs", "2", "--sft-expert-prob", "0"])
    assert (given.num_updates, given.num_envs, given.eval_envs, given.sft_expert_prob) == (
        3, 2, TABLE_1[task]["eval_envs"] if task in ("points24", "blackjack") else 2, 0.0)  # a flag wins
    assert R.parse_args(["--task", task, "--load", str(tmp_path)]).sft_steps == 0  # a loaded model is trained
    assert R.parse_args(["--task", task, "--eval-episodes", "50"]).eval_start_episodes == 50  # before RL too


def test_help_shows_every_default_and_no_constant_names():
    """Every flag that takes a value shows its default; those that vary by task list each task's value."""
    text = R.make_parser().format_help()
    for action in R.make_parser()._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in ("help", "model"):
            if action.dest in ("task", "load", "device", "save_dir", "resume", "no_cot", "tiny_size"):
                continue  # their help says what happens without them
            assert "default:" in " ".join(action.help.split()) or action.default is not None, action.dest
    flat = " ".join(text.split())
    assert "numberline 100, ezpoints 20, points24 20, blackjack 200" in flat
    assert "numberline 200, ezpoints 200, points24 200, blackjack 2000" in flat  # --eval-start-episodes
    assert "(default: 32; a real checkpoint 4)" in flat and "(default: 0.2)" in flat
    helps = " ".join(a.help for a in R.make_parser()._actions)
    assert not re.search(r"\b[A-Z]{2,}_[A-Z_]+\b", helps)  # no constant's name
    assert "--kl-decay" not in text and "--kl-action" not in text


def test_sft_learning_rate_warms_up_then_follows_the_cosine():
    lr = R.sft_learning_rate
    cosine = [lr(s, 3000, 1e-3) for s in range(3000)]  # warmup=0: the cosine alone
    assert cosine[0] == 1e-3 and abs(cosine[-1] - 1e-4) < 1e-9 and all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert R.parse_args(["--task", "numberline"]).sft_warmup == 0 < R.parse_args(["--task", "points24"]).sft_warmup
    warm = [lr(s, 3000, 1e-3, warmup=200) for s in range(3000)]
    assert abs(warm[0] - cosine[0] / 200) < 1e-15 and warm[99] == cosine[99] / 2
    assert all(a < b for a, b in zip(warm[:199], warm[1:200]))  # rising over the warm-up
    assert warm[199:] == cosine[199:]  # then the same schedule as without
    assert R.parse_args(["--task", "points24", "--sft-warmup", "0"]).sft_warmup == 0  # the flag wins
    assert R.parse_args(["--task", "blackjack", "--sft-warmup", "200"]).sft_warmup == 200


def test_a_real_checkpoint_gets_defaults_that_fit_one_gpu(tmp_path):
    """A real checkpoint (a hub id, or a folder this file did not build from the tiny model) gets the
    defaults that fit a 7B model with --lora on one 80 GB GPU; the tiny model, and what is trained from it
    (through LoRA bases too), keeps the CPU defaults; flags given win."""
    real = {"micro_batch_size": 4, "num_envs": 4, "max_new_tokens": 256, "lr": 1e-5, "gradient_checkpointing": True,
            "sft_steps": 0}
    tiny = {"micro_batch_size": 32, "num_envs": 8, "max_new_tokens": 96, "lr": 1e-4, "gradient_checkpointing": False,
            "sft_steps": 1300}

    def defaults(*argv):
        args = R.parse_args(list(argv))
        return {k: getattr(args, k) for k in real}, args.tiny

    sft, lora, hub = tmp_path / "sft", tmp_path / "lora", tmp_path / "hub"
    for folder, meta in ((sft, {"base_model": "tiny"}), (lora, {"base_model": str(sft), "lora": True}), (hub, None)):
        folder.mkdir()
        if meta:
            (folder / "rl4vlm.json").write_text(json.dumps(meta))
    assert defaults() == (tiny, True) and defaults("--tiny-arch", "gemma3") == (tiny, True)
    assert defaults("--model", "llava-hf/llava-v1.6-mistral-7b-hf", "--lora") == (real, False)
    assert defaults("--model", str(hub)) == (real, False) and defaults("--load", str(hub)) == (real, False)
    assert defaults("--model", str(sft), "--lora") == ({**tiny, "sft_steps": 0}, True)
    assert defaults("--load", str(lora)) == ({**tiny, "sft_steps": 0}, True)
    args = R.parse_args(["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--micro-batch-size", "2", "--no-gradient-checkpointing"])
    assert (args.micro_batch_size, args.gradient_checkpointing, args.num_envs) == (2, False, 4)
    args = R.parse_args(["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--task", "blackjack"])
    assert (args.num_envs, args.eval_envs, args.lr, args.num_updates, args.kl_coef) == (4, 4, 1e-5, 200, 2.0)


def test_parse_action_well_formed_and_messy():
    names = ["-", "+"]
    assert R.parse_action('{"current number": 1, "thoughts": "go right", "action": "+"}', names) == 1
    assert R.parse_action('```json\n{"thoughts": "x", "action": "-"}\n```', names) == 0
    assert R.parse_action('Sure! Here it is: {"action": "+"} Hope that helps.', names) == 1
    assert R.parse_action("{'thoughts': 'left', 'action': '-'}", names) == 0  # single quotes
    assert R.parse_action('{"thoughts": "a", "action": "+",}', names) == 1  # trailing comma
    assert R.parse_action('{"ACTION": " + "}', names) == 1  # key case, spaces
    assert R.parse_action('{"action": 7}', P24) == P24.index("7")  # a number for a string
    assert R.parse_action('{"action": 10.0}', P24) == P24.index("10")
    assert R.parse_action('{"action": "hit"}', ["stand", "hit"]) == 1
    assert R.parse_action('{"action": "Stand"}', ["stand", "hit"]) == 0
    # Broken JSON: the fallback rule, the values after an action key name one legal action.
    assert R.parse_action('{"thoughts": "unterminated, "action": "+"', names) == 1
    assert R.parse_action('thoughts: 3 < 5 so action: +', names) == 1
    assert R.parse_action('"action": "10"', P24) == P24.index("10")  # "10" is not "1"
    assert R.parse_action('"action": "1"', P24) == P24.index("1")


def test_parse_action_rejects_no_or_several_actions():
    names = ["-", "+"]
    assert R.parse_action("", names) is None
    assert R.parse_action('{"thoughts": "+ or -"}', names) is None  # no action key
    assert R.parse_action('{"action": "right"}', names) is None  # not a legal action
    assert R.parse_action('{"action": ["+", "-"]}', names) is None
    assert R.parse_action('{"action": true}', names) is None
    assert R.parse_action('{"action": "+"} {"action": "-"}', names) is None  # two different actions
    assert R.parse_action('"action": "+", "action": "-"', names) is None
    assert R.parse_action('{"action": "+"} {"action": "+"}', names) == 1  # the same one twice is one
    assert R.parse_action("+", names) is None  # no "action" key at all
    assert R.parse_action(None, names) is None


def test_parse_action_never_raises():
    rng = random.Random(0)
    names = P24
    pieces = ['{', '}', '"action"', ':', '"', "'", ",", "[", "]", "10", "+", "\\", "\n", "null", "{{{{", "\x00", "é"]
    for _ in range(3000):
        if rng.random() < 0.5:
            text = bytes(rng.randrange(256) for _ in range(rng.randrange(200))).decode("latin-1")
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        a = R.parse_action(text, names)
        assert a is None or 0 <= a < len(names)
    deep = "[" * 100_000 + '{"action": "+"}'
    assert R.parse_action(deep, ["-", "+"]) in (None, 1)
    assert R.parse_action("{" * 200_000, ["-", "+"]) is None


def test_prompts_list_actions_and_formats():
    env = envs.make("ezpoints")
    _, info = env.reset(seed=3, options={"cards": ["2", "K"]})
    env.step(env.action_names.index("10"))
    info = env.step(env.action_names.index("+"))[4]
    p = R.build_prompt("ezpoints", env.action_names, info, cot=True)
    assert "The formula so far is '10 +'." in p  # the formula so far, as the official prompt shows it
    legal = re.search(r"Legal actions: (.*)\.\n", p).group(1)
    assert legal == ", ".join(f'"{a}"' for a in env.action_names)  # every legal action, each once
    assert p.index('"cards"') < p.index('"thoughts"') < p.index('"action"')  # CoT first, action last
    q = R.build_prompt("ezpoints", env.action_names, info, cot=False)
    assert '"thoughts"' not in q and '"action"' in q


@pytest.mark.parametrize("task", list(envs.TASKS))
def test_demo_answers_parse_back(task):
    env = envs.make(task)
    _, info = env.reset(seed=0)
    for a, name in enumerate(env.action_names):
        for cot in (True, False):
            text = R.format_response(task, info, name, cot)
            assert R.parse_action(text, env.action_names) == a
            assert list(json.loads(text))[-1] == "action"


def test_blackjack_thoughts_relate_the_hand_to_the_next_card_truthfully():
    """The Blackjack demo thoughts state the hand, the dealer card's worth and which next cards bust;
    every such claim is checked against the rules for all hands of two or three cards. They never
    say what to do (that is left to RL)."""
    hands = [[a, b] for a in envs.RANKS for b in envs.RANKS] + [[a, "5", c] for a in "2K" for c in envs.RANKS]
    for hand in hands:
        total, soft = envs.hand_value(hand)
        if total > 21:
            continue  # a bust hand is never asked about
        for up in ("A", "7", "K"):
            info = {"player_cards": hand, "player_total": total, "usable_ace": soft, "dealer_card": up}
            text = envs.BlackjackEnv.thoughts(info)
            assert text.startswith(f"I have {total}{' with a usable ace' if soft else ''} and the dealer shows {up}")
            assert f"worth {envs.VALUE[up] if up != 'A' else '1 or 11'};" in text
            assert "hit" not in text and "stand" not in text
            busts = {r for r in envs.RANKS if envs.hand_value(hand + [r])[0] > 21}
            m = re.search(r"a card above (\d+) busts me", text)
            if m:
                assert busts == {r for r in envs.RANKS if envs.VALUE[r] > int(m.group(1))} != set(), text
            else:
                assert busts == (set() if "no card busts me" in text else set(envs.RANKS)), text


def test_formula_thoughts_plan_a_solution_with_the_next_unit_after_the_bar():
    """The formula games' demo thoughts write one solution of the cards that starts with the formula so
    far, a bar where that formula ends, and the expert's next unit right after the bar ("=" when the
    bar stands last), at every step of the expert's episodes; an unsolvable deal says so."""
    for task in ("ezpoints", "points24"):
        env, game = envs.make(task), (envs.EZPointsEnv if task == "ezpoints" else envs.Points24Env)
        for seed in range(40):
            info, done = env.reset(seed=seed)[1], False
            while not done:
                a = env.expert_action()
                text, name = envs.TASKS[task].thoughts(info), env.action_names[a]
                assert text.startswith(f"The cards are {', '.join(map(str, info['numbers']))}; ")
                if text.endswith(f"; no formula from here makes {game.target}."):
                    assert envs.continue_solution(info["numbers"], [], game.target, game.ops) is None
                    break
                units = re.fullmatch(rf"The cards are .+?; (.+) makes {game.target}\.", text).group(1).split()
                bar = units.index("|")
                plan = units[:bar] + units[bar + 1:]
                assert units.count("|") == 1 and envs.solves(plan, info["numbers"], game.target)
                assert units[:bar] == info["formula"].split()
                assert (units[bar + 1] if bar + 1 < len(units) else "=") == name, text
                _, _, done, _, info = env.step(a)


# --- rl4vlm.py: the model, its inputs and generation

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = R.build_tiny("llava", "mini")
    return model, processor


def _samples(model, processor, n=4, seed=0, task="ezpoints", max_new_tokens=12):
    """Real rollout samples: prompts of different lengths (formulas differ), sampled answers."""
    pool = envs.EnvPool(task, range(seed, seed + n))
    for i, env in enumerate(pool.envs):  # different formula lengths -> different prompt lengths
        for _ in range(i):
            pool.obs[i], _, _, _, pool.infos[i] = env.step(env.expert_action())
    args = R.parse_args(["--max-new-tokens", str(max_new_tokens)])
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    torch.manual_seed(seed)
    responses = R.generate(model, inputs, R.generation_config(model, processor, args))[0]
    return [R.make_sample(inputs, i, responses[i], processor.tokenizer) for i in range(n)]


def test_a_checkpoint_loads_in_the_dtype_it_was_stored_in(tiny, tmp_path):
    """bf16 on a GPU for a checkpoint stored in 16 bits (real ones: LLaVA-1.6 in fp16, Qwen in bf16), fp32
    for one stored in fp32 and on a CPU. It went by name: every --model that was not literally "tiny",
    a saved tiny model too (--model runs/tiny-sft/model --lora), ran in bf16 on a GPU."""
    from transformers import AutoConfig
    model, processor = tiny
    R.save(model, processor, R.make_value_head(R.text_hidden_size(model)), str(tmp_path / "m"), {"base_model": "tiny"})
    saved = AutoConfig.from_pretrained(tmp_path / "m")
    assert [R.model_dtype(saved, d) for d in ("cuda", "cpu")] == [torch.float32, torch.float32]
    for stored in ("float16", "bfloat16"):
        real = AutoConfig.for_model("llava", dtype=stored)
        assert [R.model_dtype(real, d) for d in ("cuda", "cpu")] == [torch.bfloat16, torch.float32]


def test_lora_wraps_only_the_language_model(tiny):
    peft = pytest.importorskip("peft")
    model, _ = R.build_tiny("llava", "mini")
    wrapped = R.add_lora(model, rank=4)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert isinstance(wrapped, peft.PeftModel)


def test_lora_without_peft_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(SystemExit, match="--lora needs peft: pip install peft"):
        R.add_lora(torch.nn.Linear(2, 2), rank=4)


def test_process_reuses_rows_and_equals_the_processor(tiny, monkeypatch):
    """process() keeps each (prompt, image) pair's row: batches of new, seen and repeated pairs, with and
    without CoT, give exactly what one processor call with padding=True gives, also when the store
    is full and starts again in the middle of a batch."""
    from PIL import Image
    _, processor = tiny

    def check(prompts, images):
        want = processor(text=R.chat_texts(processor, prompts), images=[Image.fromarray(im) for im in images],
                         padding=True, return_tensors="pt")
        got = R.process(processor, prompts, images, "cpu")
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    R.PROCESSED.pop(processor, None)
    rng, seen = random.Random(0), set()
    pools = [envs.EnvPool("ezpoints", range(4, 10)), envs.EnvPool("numberline", range(4, 10))]
    for step in range(4):
        for pool in pools:
            prompts = R.prompts(pool, step % 2 == 0) + R.prompts(pool, True)[:2]  # two pairs twice at even steps
            images = pool.obs + pool.obs[:2]
            check(prompts, images)
            seen |= {(p, im.tobytes()) for p, im in zip(prompts, images)}
            pool.step([rng.randrange(len(pool.action_names)) for _ in pool.envs])
    assert len(R.PROCESSED[processor]) == len(seen) < 4 * 2 * 8  # one row per distinct pair

    monkeypatch.setattr(R, "PROCESSED_MAX", 8)
    pool = envs.EnvPool("points24", range(4, 14))  # ten different deals
    prompts = R.prompts(pool, True)
    R.PROCESSED.pop(processor)
    check(prompts[:6], pool.obs[:6])
    check(prompts[:2] + prompts[6:], pool.obs[:2] + pool.obs[6:])  # 2 kept + 4 new > 8: starts again
    assert len(R.PROCESSED[processor]) == 6


def _checkpoint(model, processor, path, **generation):
    """The model saved as a real checkpoint is, with `generation` in its generation_config.json, and loaded
    as --model loads one."""
    model = copy.deepcopy(model)
    for k, v in generation.items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return R.load_vlm(str(path), "cpu")


def _trained_logits(model, scale=20.0):
    """A copy of the tiny random model with logits of a trained model's size (its own are about 0.1)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_rollouts_sample_from_the_policy_ppo_scores(tiny, tmp_path):
    """A checkpoint's generation_config.json may set sampling options (Qwen2-VL's and Qwen2.5-VL's Instruct
    models: repetition_penalty 1.05), which generate() applies wherever our config is silent. The answers
    were then drawn from another distribution than the softmax(logits / T) whose log-probs the rollout
    stores, while the first PPO ratio still read 1. Stored log-probs must be those generate sampled from."""
    model, processor = _checkpoint(_trained_logits(tiny[0]), tiny[1], tmp_path, repetition_penalty=1.05, do_sample=True, top_k=5)
    model.eval()
    pool = envs.EnvPool("ezpoints", range(4))
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    config = R.generation_config(model, processor, R.parse_args(["--max-new-tokens", "24"]))
    torch.manual_seed(0)
    responses, token_logp, _ = R.generate(model, inputs, config)
    config.output_scores = config.output_logits = config.output_hidden_states = True
    torch.manual_seed(0)
    out = model.generate(**inputs, generation_config=config)  # the same draws, with what they were drawn from
    sampled = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, out.sequences[:, -len(out.scores):, None])[..., 0]
    for i, r in enumerate(responses):
        assert torch.equal(out.sequences[i, inputs["input_ids"].shape[1]:][:len(r)], r)
        assert torch.allclose(token_logp[i, :len(r)], sampled[i, :len(r)], atol=1e-4)


def test_answers_end_at_every_end_token_the_checkpoint_declares(tiny, tmp_path):
    """Gemma 3 IT ends a turn with <end_of_turn>, which its generation_config.json lists beside the
    tokenizer's <eos>; generation stopped, and answers were cut, at the tokenizer's alone."""
    model, processor = tiny
    model.eval()
    pool = envs.EnvPool("numberline", range(4))
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    config = R.generation_config(model, processor, R.parse_args(["--max-new-tokens", "12"]))
    torch.manual_seed(0)
    plain = R.generate(model, inputs, config)[0]
    assert all(len(r) == 12 for r in plain)  # the random model never samples its EOS
    end = int(plain[0][2])  # the third token of the first answer stands for <end_of_turn>
    eos = processor.tokenizer.eos_token_id
    model, processor = _checkpoint(model, processor, tmp_path, eos_token_id=[eos, end])
    config = R.generation_config(model, processor, R.parse_args(["--max-new-tokens", "12"]))
    assert set(config.eos_token_id) == {eos, end}
    torch.manual_seed(0)
    cut = R.generate(model, inputs, config)[0]
    for p, c in zip(plain, cut):  # the same draws, each cut after its first end token
        n = next((k + 1 for k, t in enumerate(p.tolist()) if t == end), len(p))
        assert torch.equal(c, p[:n])
    assert len(cut[0]) <= 3


def test_generate_and_scoring_see_the_same_context(tiny):
    """Greedy answers from a left-padded batch are the argmax of the scoring forward at every token."""
    model, processor = tiny
    model.eval()
    pool = envs.EnvPool("ezpoints", range(5, 8))
    for _ in range(2):
        pool.obs[2], _, _, _, pool.infos[2] = pool.envs[2].step(pool.envs[2].expert_action())
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    gc = R.generation_config(model, processor, R.parse_args(["--max-new-tokens", "10"]))
    gc.do_sample = False
    responses = R.generate(model, inputs, gc)[0]
    samples = [R.make_sample(inputs, i, responses[i], processor.tokenizer) for i in range(3)]
    batch = R.collate(samples, processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp = R.answer_logp(R.token_logprobs(model, batch, temperature=1.0)[0], batch)
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        greedy_lp = logp[i, :n]
        # every greedy token has the largest log-prob; compare with the logsumexp bound log p <= 0
        ids = torch.cat([s["prompt_ids"], s["response_ids"]])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, **s["image"]).logits[0]
        logits[:, model.config.image_token_id] = float("-inf")
        best = torch.log_softmax(logits, -1)[len(s["prompt_ids"]) - 1:-1].max(-1).values[:n]
        assert torch.allclose(greedy_lp, best, atol=1e-4)


# --- rl4vlm.py: scoring

def test_action_start_splits_at_the_action_key(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    text = ' {"current number": 2, "target number": 5, "thoughts": "The current number is 2.", "action": "+"}'
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    k = R.action_start(tok, ids)
    thought = tok.decode(ids[:k], skip_special_tokens=True)
    action = tok.decode(ids[k:], skip_special_tokens=True)
    assert thought + action == text
    assert '"action"' in action and '"action"' not in thought and action.rstrip().endswith('"+"}')
    assert thought.endswith("2.\",") or thought.endswith("2.\", ")
    no_key = tok(' {"thoughts": "hmm"}', add_special_tokens=False).input_ids
    assert R.action_start(tok, no_key) == len(no_key)  # no key: all thoughts


def test_parse_and_scoring_agree_on_the_action_key(tiny):
    """Every spelling of the key that parse_action plays ('action', "Action", spaces) is where
    action_start puts the first action token, so those answers' action tokens get the full weight."""
    tok = tiny[1].tokenizer
    for text in [' {"thoughts": "my reaction: go up", "action": "+"}', " {'thoughts': 'go up', 'action': '+'}",
                 ' {"thoughts": "go up", "Action": "+"}', ' { "thoughts": "go up" , "ACTION" : "+" }',
                 ' {"thoughts": "go up", action: "+"}']:
        assert R.parse_action(text, ["-", "+"]) == 1, text
        ids = tok(text, add_special_tokens=False).input_ids
        k = R.action_start(tok, ids)
        thought, action = tok.decode(ids[:k]), tok.decode(ids[k:])
        assert thought + action == text and "+" in action and "+" not in thought, (text, k)
        assert re.search(R.ACTION_KEY, action, re.IGNORECASE) and not re.search(R.ACTION_KEY, thought, re.IGNORECASE)


def _byte_fallback_tokenizer():
    """A BPE that spells what it does not know as UTF-8 byte tokens (<0xE2>...), as Llama's, Mistral's and
    Gemma's do, trained on ASCII answers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    texts = [' {"thoughts": "the number is %d and up", "action": "+"}' % i for i in range(50)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    spec = json.loads(bpe.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_action_start_with_a_byte_fallback_tokenizer():
    """A prefix that ends inside a character such a tokenizer spells in bytes decodes to a replacement
    character per byte, longer than the text it stands for, so the decoded length of prefixes is not
    monotone: a binary search on it put the action's start early in 38 of these 120 answers. The first
    action token must hold the key's first byte, counted from the tokens' own bytes."""
    tok = _byte_fallback_tokenizer()
    rng = random.Random(0)
    for _ in range(120):
        text = ' {"thoughts": "up %s", "action": "+"}' % "".join(rng.choice("→éü€😀") for _ in range(rng.randint(1, 3)))
        ids = tok(text, add_special_tokens=False).input_ids
        pieces = [bytes([int(t[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else t.replace("\u2581", " ").encode()
                  for t in tok.convert_ids_to_tokens(ids)]
        assert tok.decode(ids) == text and b"".join(pieces) == text.encode() and len(pieces) > len(text.split())
        key = len(text[:text.index('"action"')].encode())  # the key's first byte
        ends = np.cumsum([len(p) for p in pieces])
        assert R.action_start(tok, ids) == int(np.argmax(ends > key)), text


def test_action_values_follow_a_quote_token_of_their_own(tiny):
    """After '"action":' comes a ' "' token shared by all actions, then the value: so the choice of
    action is a choice between value tokens, not between a fused ' "-"}' and any other opening."""
    tok = tiny[1].tokenizer
    for task in envs.TASKS:
        env = envs.make(task)
        _, info = env.reset(seed=0)
        for name in env.action_names:
            ids = tok(" " + R.format_response(task, info, name), add_special_tokens=False).input_ids
            pieces = [tok.decode([i]) for i in ids]
            k = len(pieces) - 1 - pieces[::-1].index(' "')  # the last ' "' token
            assert "".join(pieces[:k]).endswith('"action":'), (task, name, pieces[-6:])
            assert "".join(pieces[k + 1:]) == name + '"}'


def test_scaled_logprob_matches_hand_computation(tiny):
    model, processor = tiny
    model.eval()
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor)
    T, lam = 0.2, 0.5
    batch = R.collate(samples, processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        log_pi, value, _ = R.score(model, vh, batch, T, lam)
    for i, s in enumerate(samples):
        ids = torch.cat([s["prompt_ids"], s["response_ids"]])[None]
        with torch.no_grad():
            out = model(input_ids=ids, **s["image"], output_hidden_states=True)
        logits = out.logits[0].clone()
        logits[:, model.config.image_token_id] = float("-inf")
        logp = torch.log_softmax(logits / T, -1)
        p, a = len(s["prompt_ids"]), s["action_start"]
        token_lp = [logp[p - 1 + j, tok].item() for j, tok in enumerate(s["response_ids"].tolist())]
        expected = lam * sum(token_lp[:a]) + sum(token_lp[a:])
        assert log_pi[i].item() == pytest.approx(expected, abs=1e-3, rel=1e-5)
        expected_v = vh(out.hidden_states[-1][0, p - 1])[0]
        assert value[i].item() == pytest.approx(expected_v.item(), abs=1e-5)


def _assert_batched_equals_single(model, processor, samples):
    """Scoring a left-padded batch gives each sample's log pi and value as scoring it alone."""
    vh = R.make_value_head(R.text_hidden_size(model))
    assert len({len(s["prompt_ids"]) for s in samples}) > 1  # padding really happens
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        batched = R.score(model, vh, R.collate(samples, pad, "cpu"), 0.2, 0.5)
        for i, s in enumerate(samples):
            single = R.score(model, vh, R.collate([s], pad, "cpu"), 0.2, 0.5)
            assert batched[0][i].item() == pytest.approx(single[0].item(), abs=1e-3, rel=1e-5)
            assert batched[1][i].item() == pytest.approx(single[1].item(), abs=1e-5)


def test_batched_scoring_equals_one_at_a_time(tiny):
    model, processor = tiny
    model.eval()
    _assert_batched_equals_single(model, processor, _samples(model, processor, n=4, seed=1))


def test_llava_next_layout_scores_batched_as_one_at_a_time(tiny, tmp_path):
    """LLaVA-1.6 (NeXT): pixel_values (B, tiles, 3, H, W) plus image_sizes go through process, make_sample,
    collate and score; a batch scores as each sample alone, and the saved folder loads as --model PATH."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)
    tok = tiny[1].tokenizer
    pinpoints = [[224, 224], [112, 224], [224, 112]]  # the 224x224 env images -> 2x2 tiles + the base image
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tiny_models.CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=112, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=2048,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=64)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, processor = R.load_vlm(str(tmp_path), "cpu")  # what --model PATH does
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    model.eval()
    samples = _samples(model, processor, n=3, seed=1, max_new_tokens=6)
    assert samples[0]["image"]["pixel_values"].shape == (1, 5, 3, 112, 112)  # 4 tiles + the base image
    assert samples[0]["image"]["image_sizes"].tolist() == [[224, 224]]
    _assert_batched_equals_single(model, processor, samples)


def test_rollout_log_pi_and_value_from_generate_equal_scoring(tiny):
    """The rollout stores old log pi and V(s) read off generate's own logits and hidden states; PPO
    recomputes them with score(). Both must agree, or the first PPO ratio is not 1."""
    model, processor = tiny
    model.eval()
    vh = R.make_value_head(R.text_hidden_size(model))
    pool = envs.EnvPool("ezpoints", range(3, 7))
    for i, env in enumerate(pool.envs):  # different prompt lengths, so the batch is left-padded
        for _ in range(i):
            pool.obs[i], _, _, _, pool.infos[i] = env.step(env.expert_action())
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    torch.manual_seed(0)
    responses, token_logp, hidden = R.generate(model, inputs, R.generation_config(
        model, processor, R.parse_args(["--max-new-tokens", "24", "--temperature", "0.7"])))
    samples = [R.make_sample(inputs, i, responses[i], processor.tokenizer) for i in range(4)]
    assert len({len(r) for r in responses}) > 1 or len(responses[0]) == 24  # rows end at different lengths
    thought_mask, action_mask = R.answer_masks(samples, token_logp.shape[1])
    with torch.no_grad():
        from_generate = R.lambda_log_pi(token_logp, thought_mask, action_mask, 0.5)
        value_generate = vh(hidden)[:, 0]
        log_pi, value, _ = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.7, 0.5)
    assert torch.allclose(from_generate, log_pi, atol=1e-3, rtol=1e-5)
    assert torch.allclose(value_generate, value, atol=1e-5)
    assert (from_generate < 0).all()


@pytest.mark.parametrize("arch, lora", [("llava", False), ("llava", True), ("qwen2.5-vl", False)])
def test_gradient_checkpointing_changes_no_number(arch, lora, tmp_path):
    """--gradient-checkpointing (a real checkpoint's default) recomputes each layer in the backward pass:
    log pi, V(s) and every gradient as without it, with LoRA's frozen base too (non-reentrant); so too the
    whole PPO loss with the KL term, for a policy that has moved from its reference (with LoRA: a trained
    adapter beside the reference adapter, which no gradient reaches)."""
    if lora:
        pytest.importorskip("peft")
    model, processor = R.build_tiny(arch, "mini")
    R.save(model, processor, R.make_value_head(R.text_hidden_size(model)), str(tmp_path / "m"), {"base_model": "tiny"})
    flags = ["--model", str(tmp_path / "m"), "--lora-rank", "4", "--save-dir", str(tmp_path / "x")] + (["--lora"] if lora else [])
    samples = _samples(model.eval(), processor, n=3, seed=1, max_new_tokens=8)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        agent = R.build_agent(R.parse_args(flags + [f"--{'' if checkpointing else 'no-'}gradient-checkpointing"]), "cpu")
        m, proc, vh = agent.model, agent.processor, agent.value_head
        assert m.is_activation_checkpointing == checkpointing
        m.train()
        saved = []  # what autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            log_pi, value, _ = R.score(m, vh, R.collate(samples, proc.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
        (log_pi.sum() + value.sum()).backward()
        grads = {n: p.grad.clone() for n, p in list(m.named_parameters()) + list(vh.named_parameters()) if p.grad is not None}
        agent.ref = R.make_reference(m)
        with torch.no_grad():  # the policy moves away from the reference
            for n, p in m.named_parameters():
                p.add_(0.05 * torch.randn_like(p)) if p.requires_grad else None
        m.zero_grad(set_to_none=True)
        vh.zero_grad(set_to_none=True)
        args = R.parse_args(flags + ["--kl-coef", "1"])
        batch = R.collate(samples, proc.tokenizer.pad_token_id, "cpu")
        old = (torch.tensor([-3.0, -2.0, -4.0]), torch.zeros(3), torch.tensor([1.0, -0.5, 0.3]), torch.ones(3))
        loss, parts = R.ppo_loss(agent, batch, old, args)
        loss.backward()
        assert parts["ref_kl"] > 0
        ppo = {n: p.grad.clone() for n, p in list(m.named_parameters()) + list(vh.named_parameters()) if p.grad is not None}
        assert not [n for n in ppo if ".reference." in n]  # the reference adapter gets no gradient
        results.append((log_pi.detach(), value.detach(), grads, sum(saved), loss.item(), ppo))
    (lp0, v0, g0, kept0, loss0, ppo0), (lp1, v1, g1, kept1, loss1, ppo1) = results
    assert abs(loss0 - loss1) < 1e-5 and ppo0.keys() == ppo1.keys() and len(ppo0) > (10 if lora else 20)
    for n in ppo0:
        assert torch.allclose(ppo0[n], ppo1[n], atol=1e-5, rtol=1e-4), n
    assert kept1 < 0.8 * kept0  # the layers' activations are recomputed, not kept
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > (10 if lora else 20)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n


# --- rl4vlm.py: SFT, rollouts, GAE, PPO and evaluation

@pytest.mark.parametrize("restart_prob", [0.0, 1.0])
def test_sft_restarts_demo_episodes_for_more_start_states(tiny, monkeypatch, restart_prob, tmp_path):
    """The formula games' SFT starts episodes over (the formula so far gives away the cards played):
    at --sft-restart-prob 1 every demonstration is a start state, at 0 the expert's episodes go on."""
    seen = []
    demo = R.format_response
    monkeypatch.setattr(R, "format_response", lambda task, info, *a: seen.append(info["formula"]) or demo(task, info, *a))
    args = R.parse_args(["--task", "ezpoints", "--sft-steps", "3", "--sft-batch-size", "4",
                         "--sft-restart-prob", str(restart_prob), "--save-dir", str(tmp_path)])
    assert args.sft_expert_prob == 1
    agent = _agent(copy.deepcopy(tiny[0]), tiny[1], R.make_value_head(R.text_hidden_size(tiny[0])))
    monkeypatch.setattr(R, "check_reading", lambda *a: 0)  # the reading probe asks for no more steps
    R.sft(agent, args, R.open_run(args))
    assert len(seen) == 12 and seen[:4] == [""] * 4
    assert (set(seen) == {""}) == (restart_prob == 1)


@pytest.mark.parametrize("reads_after", [1, None])
def test_sft_goes_on_while_a_field_is_misread(tiny, monkeypatch, tmp_path, reads_after):
    """After --sft-steps, the reading probe: a field misread in more than one of its 96 states, but read in
    half of them or more, gets a tenth of --sft-steps more (at the last learning rate), up to half as many
    again; a miss in one state is sampling's luck; a field read in fewer than half never learned to read.
    The run says what it reads, and results.json holds the shares and the extra steps."""
    probes, steps, lrs, printed = [], [], [], []
    read = {"current number": 1.0, "target number": 1.0}
    misread = {"current number": 1.0, "target number": 94 / 96}

    def probe(agent, args, states):
        probes.append(states)
        return (read if reads_after is not None and len(probes) > reads_after else misread), [], []

    sft_step = R.sft_step
    monkeypatch.setattr(R, "read_probe", probe)
    monkeypatch.setattr(R, "sft_step", lambda *a: steps.append(1) or lrs.append(a[5]) or sft_step(*a))
    monkeypatch.setattr(R, "log", printed.append)
    args = R.parse_args(["--task", "numberline", "--sft-steps", "20", "--sft-batch-size", "2", "--save-dir",
                         str(tmp_path / "x")])
    run = R.open_run(args)
    R.sft(_agent(copy.deepcopy(tiny[0]), tiny[1], R.make_value_head(R.text_hidden_size(tiny[0]))), args, run)
    assert len(steps) == (22 if reads_after else 30) and len(probes) == (2 if reads_after else 6)
    assert run.results["sft_extra"] == len(steps) - 20 and run.results["reading"] == (read if reads_after else misread)
    assert lrs[20:] == [pytest.approx(args.sft_lr / 10)] * (len(steps) - 20)  # the schedule's last rate
    assert 'SFT reads "target number" in 98% of the probe states: 2 more SFT steps' in printed
    assert printed[-2] == ("SFT reads every field (current number, target number) in all the probe states" if reads_after
                           else 'SFT reads "target number" in 98% of the probe states; more --sft-steps may help')
    one_miss = {"current number": 1.0, "target number": 95 / 96}
    monkeypatch.setattr(R, "read_probe", lambda *a: (one_miss, [], []))
    assert R.check_reading(None, args, R.Run("x", collections.deque())) == 0  # one state: no more steps
    never = {"current number": 1.0, "target number": 47 / 96}  # under half: it never learned to read it
    monkeypatch.setattr(R, "read_probe", lambda *a: (never, [], []))
    assert R.check_reading(None, args, R.Run("x", collections.deque())) == 0
    assert printed[-1] == 'SFT reads "target number" in 49% of the probe states; more --sft-steps may help'


def _agent(model, processor, value_head=None, ref=None):
    return R.Agent(model, processor, value_head, torch.device("cpu"), "tiny", ref)


def _perturbed_copy(model, scale=0.02):
    """A KL reference that the policy is not: a copy of the model with noise on every weight."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


def _rollout(samples, old_log_pi, old_values):
    """A Rollout with what ppo_update reads: the samples and their old log pi and V(s)."""
    return R.Rollout(samples, old_log_pi, old_values, *[None] * 5, finished=[], invalid=[])


@pytest.mark.parametrize("steps, envs_, minibatch, micro", [(3, 8, 8, 4), (3, 2, 4, 4), (3, 2, 2, 4)])
def test_in_16_bits_the_first_ratio_is_one(tiny, steps, envs_, minibatch, micro, monkeypatch):
    """In bf16 generate's cached decode rounds differently from a forward over prompt + answer, and so do
    forwards of other shapes: old log pi read off generate gave the tiny model (in bf16, trained logits'
    size) log ratios up to 0.4 before any update and a quarter of them clipped. The rollout scores its
    answers with the update's forward at one shape, rows included (on a GPU another row count may be
    another kernel): T x N = 6 in micro-batches of 4 (a partial one), a minibatch under the micro-batch.
    With lr 0 every ratio of every epoch is 1."""
    model = _trained_logits(tiny[0]).to(torch.bfloat16).eval()
    processor = tiny[1]
    vh = R.make_value_head(R.text_hidden_size(model))
    args = R.parse_args(["--task", "ezpoints", "--num-steps", str(steps), "--num-envs", str(envs_), "--max-new-tokens",
                         "16", "--minibatch-size", str(minibatch), "--micro-batch-size", str(micro), "--update-epochs",
                         "2", "--target-kl", "1e9"])
    pool = envs.EnvPool("ezpoints", range(envs_))
    for i, env in enumerate(pool.envs):  # formulas of different lengths: prompts of different lengths
        for _ in range(i % 3):
            pool.obs[i], _, _, _, pool.infos[i] = env.step(env.expert_action())
    shapes, token_logprobs = [], R.token_logprobs
    monkeypatch.setattr(R, "token_logprobs", lambda m, batch, t: shapes.append(tuple(batch["input_ids"].shape) + (
        batch["thought_mask"].shape[1],)) or token_logprobs(m, batch, t))
    torch.manual_seed(0)
    rollout = R.collect_rollout(_agent(model, processor, vh), pool, R.generation_config(model, processor, args), args,
                                random.Random(0), R.make_timer()[0])
    assert rollout.shape is not None and len({len(s["prompt_ids"]) for s in rollout.samples}) > 1
    scored = shapes[-math.ceil(steps * envs_ / micro):]  # the rescore's forwards
    opt = torch.optim.Adam(list(model.parameters()) + list(vh.parameters()), lr=0.0)
    g = torch.Generator().manual_seed(0)
    shapes.clear()
    stats = R.ppo_update(_agent(model, processor, vh), opt, rollout, torch.randn(steps, envs_, generator=g),
                         torch.randn(steps, envs_, generator=g), args, random.Random(0))
    assert stats["approx_kl"] == 0.0 and stats["clip_frac"] == 0.0
    assert len(set(scored + shapes)) == 1 and scored[0][0] == micro, (scored, shapes)  # every forward one shape


def test_full_fine_tuning_in_16_bits_moves_the_weights_as_fp32_does(tmp_path):
    """--dtype bfloat16 without --lora computes in bf16 over fp32 weights that Adam steps (gradients in fp32
    too). A step at lr 1e-5 is under half of bf16's spacing for most weights: bf16 weights would round most
    of it away. 3 updates at lr 1e-5 change about as many weights in 16 bits as in 32."""
    changed = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        args = R.parse_args(["--task", "numberline", "--dtype", dtype, "--lr", "1e-5", "--num-steps", "2",
                             "--num-envs", "4", "--max-new-tokens", "12", "--minibatch-size", "8",
                             "--micro-batch-size", "4", "--save-dir", str(tmp_path / dtype)])
        agent = R.build_agent(args, torch.device("cpu"))
        assert {p.dtype for p in agent.model.parameters()} == {torch.float32}
        assert R.computes_in(agent.model) == getattr(torch, dtype)
        agent.ref = R.make_reference(agent.model)
        assert R.computes_in(agent.ref) == next(agent.ref.parameters()).dtype == getattr(torch, dtype)
        optimizer, rng = R.rl_optimizer(agent, args), random.Random(0)
        before = {n: p.detach().clone() for n, p in agent.model.named_parameters() if p.requires_grad}
        pool = envs.EnvPool("numberline", [envs.episode_seed("rollout", i) for i in range(4)])
        for _ in range(3):
            rollout = R.collect_rollout(agent, pool, R.generation_config(agent.model, agent.processor, args), args,
                                        rng, R.make_timer()[0])
            assert (rollout.shape is None) == (dtype == "float32")  # 16 bits: rescored at one shape
            adv, ret = R.compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                                     rollout.final_values, rollout.last_values, 0.9, 0.95)
            R.ppo_update(agent, optimizer, rollout, adv, ret, args, rng)
        params = dict(agent.model.named_parameters())
        moved = sum(int((params[n] != p).sum()) for n, p in before.items())
        changed[dtype] = moved / sum(p.numel() for p in before.values())
    assert changed["float32"] > 0.3 and changed["bfloat16"] > 0.8 * changed["float32"], changed


def _naive_gae(rewards, values, terminated, truncated, final_values, last_values, gamma, lam):
    T, N = rewards.shape
    adv = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):  # sum of (gamma * lam)^(k - t) * delta_k within the episode
                if terminated[k, n]:
                    nxt = 0.0
                elif truncated[k, n]:
                    nxt = final_values[k, n]
                else:
                    nxt = last_values[n] if k == T - 1 else values[k + 1, n]
                delta = rewards[k, n] + gamma * nxt - values[k, n]
                total += discount * delta
                discount *= gamma * lam
                if terminated[k, n] or truncated[k, n]:
                    break
            adv[t, n] = total
    return adv


def test_gae_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    T, N = 12, 5
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    final_values, last_values = torch.randn(T, N, generator=g), torch.randn(N, generator=g)
    terminated = torch.rand(T, N, generator=g) < 0.2
    truncated = (torch.rand(T, N, generator=g) < 0.15) & ~terminated
    adv, ret = R.compute_gae(rewards, values, terminated, truncated, final_values, last_values, 0.9, 0.95)
    expected = _naive_gae(rewards, values, terminated, truncated, final_values, last_values, 0.9, 0.95)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, adv + values)
    # Truncation bootstraps from the final observation; termination does not.
    one = torch.ones(1, 1)
    a_trunc, _ = R.compute_gae(one, 0 * one, one < 0, one > 0, 10 * one, torch.zeros(1), 0.9, 0.95)
    a_term, _ = R.compute_gae(one, 0 * one, one > 0, one < 0, 10 * one, torch.zeros(1), 0.9, 0.95)
    assert a_trunc.item() == pytest.approx(1 + 0.9 * 10) and a_term.item() == pytest.approx(1.0)


def test_ppo_update_follows_the_advantage(tiny):
    model, processor = tiny
    torch.manual_seed(0)
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=6, seed=2, task="numberline")
    pad = processor.tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        old_lp, old_v, _ = R.score(model, vh, R.collate(samples, pad, "cpu"), 0.2, 0.5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    args = R.parse_args(["--update-epochs", "1", "--minibatch-size", "6", "--micro-batch-size", "3", "--lr", "1e-3"])
    params = list(model.parameters()) + list(vh.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    stats = R.ppo_update(_agent(model, processor, vh), opt, _rollout(samples, old_lp, old_v), adv, old_v + adv, args, random.Random(0))
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # one step: ratio is exactly 1 when scored
    model.eval()
    with torch.no_grad():
        new_lp, _, _ = R.score(model, vh, R.collate(samples, pad, "cpu"), 0.2, 0.5)
    change = new_lp - old_lp
    assert (change[adv > 0] > 0).all() and (change[adv < 0] < 0).all(), change
    for p, b in zip(model.parameters(), before):  # restore for the other tests
        p.data.copy_(b)


def test_kl_to_the_reference_policy(tiny):
    """--kl-coef: exact KL(pi || pi_ref) per answer token, averaged over each answer; 0 for pi itself."""
    model, processor = tiny
    model.eval()
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=3, seed=2, task="numberline")
    batch = R.collate(samples, processor.tokenizer.pad_token_id, "cpu")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        assert R.score(model, vh, batch, 0.2, 0.5)[2] is None
        same = R.score(model, vh, batch, 0.2, 0.5, R.reference_logprobs(model, ref, batch, 0.2))[2]
        assert same.abs().max().item() < 1e-5
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ref_lp = R.reference_logprobs(model, ref, batch, 0.2)
        kl = R.score(model, vh, batch, 0.2, 0.5, ref_lp)[2]
        for i, s in enumerate(samples):
            ids = torch.cat([s["prompt_ids"], s["response_ids"]])[None]
            p, n = len(s["prompt_ids"]), len(s["response_ids"])
            dists = []
            for m in (model, ref):
                logits = m(input_ids=ids, **s["image"]).logits[0, p - 1:p - 1 + n]
                logits[:, model.config.image_token_id] = float("-inf")
                dists.append(torch.distributions.Categorical(logits=logits / 0.2))
            expected = torch.distributions.kl_divergence(*dists).mean()
            assert kl[i].item() == pytest.approx(expected.item(), rel=1e-3, abs=1e-5)
            assert kl[i].item() > 1e-4


def test_kl_term_pulls_the_policy_toward_the_reference(tiny):
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=4, seed=4, task="numberline")
    pad = processor.tokenizer.pad_token_id
    before = [p.detach().clone() for p in model.parameters()]
    ref = _perturbed_copy(model)

    def kl_to_ref():
        batch = R.collate(samples, pad, "cpu")
        with torch.no_grad():
            return R.score(model, vh, batch, 0.2, 0.5, R.reference_logprobs(model, ref, batch, 0.2))[2].mean()

    with torch.no_grad():
        old_lp, old_v, _ = R.score(model, vh, R.collate(samples, pad, "cpu"), 0.2, 0.5)
    start = kl_to_ref()
    opt = torch.optim.Adam(list(model.parameters()) + list(vh.parameters()), lr=1e-3)
    args = R.parse_args(["--update-epochs", "4", "--minibatch-size", "4", "--kl-coef", "1", "--vf-coef", "0",
                         "--target-kl", "1e6"])
    zero = torch.zeros(4)  # no advantage: only the KL term moves the policy
    R.ppo_update(_agent(model, processor, vh, ref), opt, _rollout(samples, old_lp, old_v), zero, old_v, args, random.Random(0))
    assert kl_to_ref() < 0.8 * start
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)


def test_the_kl_reference_is_scored_a_micro_batch_at_a_time(tiny, monkeypatch):
    """The SFT policy's log-probs over the vocabulary, (B, R, V), exist for one micro-batch at a time: an
    update's memory does not grow with rollout size x vocabulary (it kept the whole rollout's: 80-160 GB
    for Qwen2.5-VL-7B at the official rollout sizes)."""
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=6, seed=2, task="numberline")
    with torch.no_grad():
        old_lp, old_v, _ = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
    rows, reference = [], R.reference_logprobs
    monkeypatch.setattr(R, "reference_logprobs", lambda m, ref, batch, *a: rows.append(len(batch["input_ids"])) or
                        reference(m, ref, batch, *a))
    args = R.parse_args(["--update-epochs", "2", "--minibatch-size", "6", "--micro-batch-size", "2"])
    opt = torch.optim.Adam(list(model.parameters()) + list(vh.parameters()), lr=0.0)
    stats = R.ppo_update(_agent(model, processor, vh, copy.deepcopy(model)), opt, _rollout(samples, old_lp, old_v),
                         torch.zeros(6), old_v, args, random.Random(0))
    assert rows == [2] * 6  # 2 epochs x 3 micro-batches
    assert stats["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its own reference


def test_lora_kl_reference_is_the_policy_as_rl_starts(tiny, tmp_path):
    """With LoRA the KL reference is the policy at the start of RL (SFT's adapters), not the model with
    its adapters off (the model before SFT): KL 0 at the first minibatch, and RL does not move it."""
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model, processor = R.build_tiny("llava", "mini")
    model = R.add_lora(model, rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))  # what LoRA SFT does: adapters that change the output
    model.eval()
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=4, seed=3, task="numberline")
    pad = processor.tokenizer.pad_token_id
    batch = R.collate(samples, pad, "cpu")
    ref = R.make_reference(model)
    with torch.no_grad():
        ref_before = R.reference_logprobs(model, ref, batch, 0.2)
        old_lp, old_v, kl = R.score(model, vh, batch, 0.2, 0.5, ref_before)
        with model.disable_adapter():
            before_sft = R.token_logprobs(model, batch, 0.2)[0]
    assert kl.abs().max().item() < 1e-6  # the policy is its own reference when RL starts
    assert not torch.allclose(before_sft, ref_before, atol=1e-3)  # adapters off is another policy
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("default" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(trainable + list(vh.parameters()), lr=1e-2)
    args = R.parse_args(["--update-epochs", "2", "--minibatch-size", "4", "--target-kl", "1e6"])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    R.ppo_update(_agent(model, processor, vh, ref), opt, _rollout(samples, old_lp, old_v), adv, old_v, args, random.Random(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(R.reference_logprobs(model, ref, batch, 0.2), ref_before)  # did not move
        assert not torch.allclose(R.token_logprobs(model, batch, 0.2)[0], ref_before, atol=1e-4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if "default" in n and "lora_" in n]  # "default" trains
    R.save(model, processor, vh, str(tmp_path / "m"), {"base_model": "x"})  # the trained adapter alone
    assert (tmp_path / "m" / "adapter_config.json").exists() and not (tmp_path / "m" / "reference").exists()


def test_target_kl_stops_the_update_early(tiny):
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=6, seed=5, task="numberline")
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        old_lp, old_v, _ = R.score(model, vh, R.collate(samples, pad, "cpu"), 0.2, 0.5)
    before = [p.detach().clone() for p in model.parameters()]

    def optimizer_steps(target_kl):
        for p, b in zip(model.parameters(), before):
            p.data.copy_(b)
        opt = torch.optim.Adam(list(model.parameters()) + list(vh.parameters()), lr=1e-4)
        args = R.parse_args(["--update-epochs", "3", "--minibatch-size", "2", "--micro-batch-size", "2",
                             "--target-kl", str(target_kl)])
        adv = torch.tensor([1.0, -1.0] * 3)
        R.ppo_update(_agent(model, processor, vh), opt, _rollout(samples, old_lp, old_v), adv, old_v + adv, args, random.Random(0))
        return int(opt.state[next(iter(model.parameters()))]["step"])

    assert optimizer_steps(1e6) == 9  # 3 epochs x 3 minibatches
    # the first minibatch is scored before any step (KL 0); the next one sees the moved policy and stops
    assert optimizer_steps(1e-9) == 2
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)


def test_nan_loss_stops_the_update(tiny):
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=2, seed=3, task="numberline")
    args = R.parse_args(["--minibatch-size", "2", "--micro-batch-size", "2"])
    old = torch.full((2,), float("nan"))
    opt = torch.optim.Adam(vh.parameters())
    with pytest.raises(FloatingPointError, match="policy loss"):
        R.ppo_update(_agent(model, processor, vh), opt, _rollout(samples, old, torch.zeros(2)), torch.ones(2),
                     torch.ones(2), args, random.Random(0))


def test_a_one_sample_rollout_trains(tiny):
    """--num-envs 1 --num-steps 1: one advantage has no spread to normalise by (its std was NaN and the
    update stopped with "policy loss is nan")."""
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    samples = _samples(model, processor, n=1, seed=3, task="numberline")
    args = R.parse_args(["--num-envs", "1", "--num-steps", "1"])
    with torch.no_grad():
        old_lp, old_v, _ = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
    before = [p.detach().clone() for p in vh.parameters()]
    opt = torch.optim.Adam(vh.parameters(), lr=1e-3)
    stats = R.ppo_update(_agent(model, processor, vh), opt, _rollout(samples, old_lp, old_v), torch.ones(1), old_v + 1,
                         args, random.Random(0))
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(p, b) for p, b in zip(vh.parameters(), before))


def test_evaluate_leaves_the_training_rng_alone(tiny):
    """Evaluating (or not) before RL must not change the training after it: evaluate() samples from a
    forked RNG, the same noise at every evaluation, and leaves torch's global RNG where it was."""
    model, processor = tiny
    args = R.parse_args(["--task", "numberline", "--num-envs", "2", "--max-new-tokens", "8"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = R.evaluate(_agent(model, processor), args, 4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(3)
    assert R.evaluate(_agent(model, processor), args, 4) == first


def test_eval_envs_batches_the_same_episodes(tiny, monkeypatch):
    """--eval-envs sets how many evaluation episodes share one generate; the episodes are the same."""
    model, processor = tiny
    batches, pools = [], []
    generate, pool_class = R.generate, envs.EnvPool
    monkeypatch.setattr(R, "generate", lambda m, inputs, *a, **k: batches.append(len(inputs["input_ids"]))
                        or generate(m, inputs, *a, **k))
    monkeypatch.setattr(envs, "EnvPool", lambda task, seeds, queue: pools.append(seeds + list(queue))
                        or pool_class(task, pools[-1][:len(seeds)], iter(pools[-1][len(seeds):])))
    for flags in ([], ["--eval-envs", "3"]):
        args = R.parse_args(["--task", "numberline", "--num-envs", "2", "--max-new-tokens", "8", *flags])
        batches.clear()
        assert R.evaluate(_agent(model, processor), args, 5)["episodes"] == 5
        assert max(batches) == (3 if flags else 2)
    assert pools[0] == pools[1] == [envs.episode_seed("evaluation", j) for j in range(5)]


def test_reading_probe_scores_state_fields():
    """The reading probe (rl4vlm.field_shares, tools/reading.py): a demonstration's answer reads everything
    right, a swapped or broken answer does not; the constant guess scores the commonest value's share."""
    rd = runpy.run_path(READING)
    env = envs.make("points24")
    infos = [env.reset(options={"cards": c})[1] for c in (["10", "3", "8", "A"], ["K", "2", "10", "5"])]
    right = [R.format_response("points24", i, "=") for i in infos]
    assert R.field_shares("points24", right, infos) == {"cards": 1.0, "formula": 1.0}
    assert rd["element_shares"]("points24", right, infos) == {"cards": 1.0}
    swapped = right[0].replace("[10, 3, 8, 1]", "[3, 10, 8, 1]")
    assert R.field_shares("points24", [swapped, "not json"], infos) == {"cards": 0.0, "formula": 0.5}
    assert rd["element_shares"]("points24", [swapped, "not json"], infos) == {"cards": 0.25}  # 2 of 8 cards right
    guess = rd["constant_guess"]("points24", infos)
    assert guess["cards"] == (0.5, 3 / 8) and guess["formula"] == (1.0, None)  # 10 is 3 of the 8 cards


# --- rl4vlm.py: the command line

def _run(*argv, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # no model hub, at once
    return subprocess.run([sys.executable, os.path.join(HERE, "rl4vlm.py"), *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE, env=env)


# The short run every command-line test starts from (a flag given after it wins): seconds, not minutes.
SHORT = ["--task", "numberline", "--sft-steps", "2", "--sft-batch-size", "2", "--num-updates", "1", "--num-steps", "2",
         "--num-envs", "2", "--max-new-tokens", "8", "--minibatch-size", "4", "--micro-batch-size", "2",
         "--eval-episodes", "0"]


def _tiny_cli(out, *extra):
    return [*SHORT, "--save-dir", str(out), *extra]


def test_cli_short_run_writes_metrics_and_model(tmp_path):
    out = tmp_path / "run"
    r = _run(*_tiny_cli(out, "--task", "ezpoints", "--sft-steps", "3", "--num-updates", "2", "--max-new-tokens", "16",
                        "--eval-episodes", "2", "--eval-start-episodes", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("update,env_steps,success") and len(lines) == 3
    assert lines[2].split(",")[1] == "8"  # 2 updates x 2 steps x 2 envs
    assert "answer:" in r.stdout + r.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["start"]["episodes"] == 1 and results["final"]["episodes"] == 2  # before RL, after RL
    printed = r.stdout + r.stderr
    assert "success on 2 evaluation episodes: SFT start" in printed and "(on 1) -> after RL" in printed
    assert results["finished"] and set(results["reading"]) == {"cards", "formula"}  # the probe after SFT
    assert "SFT reads" in printed and "of the probe states" in printed and "to go" in printed
    assert (out / "sft.csv").read_text().splitlines()[0] == "step,loss,lr"  # SFT's loss, a row per logged step
    # evaluate the saved model again, with no training: --load takes the run's folder (or its model/)
    r2 = _run("--load", str(out), "--num-updates", "0", "--eval-episodes", "2",  # the task is the model's
              "--num-envs", "2", "--max-new-tokens", "16", "--save-dir", str(tmp_path / "again"))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "task ezpoints, CoT" in r2.stdout + r2.stderr and "note:" not in r2.stdout + r2.stderr
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["start"]["episodes"] == 2 and "final" not in again  # evaluated once
    assert not (tmp_path / "again" / "model").exists()  # nothing trained, nothing saved
    # tools/reading.py reads the saved model's state fields; dev/reading.py plays its probe states
    def reading(tool, *flags):
        return subprocess.run([sys.executable, tool, str(out), *flags], capture_output=True, text=True,
                              timeout=300, cwd=HERE)
    r3 = reading(READING, "--states", "3")
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert "3 start states" in r3.stdout and "cards: exact" in r3.stdout and "formula: exact" in r3.stdout
    r4 = reading(PROBES, "--states", "2", "--play")
    assert r4.returncode == 0, r4.stderr[-2000:]
    assert "played to the end" in r4.stdout and "the action is its next unit" in r4.stdout
    assert "thoughts' formula solves the cards" in r4.stdout
    r5 = reading(PROBES, "--policy")
    assert r5.returncode == 1 and r5.stderr.strip() == ("reading.py: error: --policy is for Blackjack and "
                                                        "NumberLine; this model plays ezpoints")
    r6 = reading(PROBES, "--three-cards")
    assert r6.returncode == 1 and r6.stderr.strip() == ("reading.py: error: --three-cards is for Blackjack; "
                                                        "this model plays ezpoints")


@pytest.mark.parametrize("argv, message", [
    (["--task", "chess"], "invalid choice: 'chess'"),
    (["--num-envs", "0"], "must be a positive integer"),
    (["--temperature", "-1"], "must be a positive number"),
    (["--thought-coef", "2"], "between 0 and 1"),
    (["--model", "/no/such/folder"], "model folder not found"),
    (["--load", "/no/such/folder"], "--load folder not found"),
    (["--lora"], "--lora needs a base model saved on disk"),  # the random tiny base could not be reloaded
    (["--seed", "-1"], "must be zero or more"),
    (["--tiny-arch", "llama4"], "invalid choice: 'llama4'"),
    (["--gamma", "5"], "must be between 0 and 1"),
    (["--gae-lambda", "-0.1"], "must be between 0 and 1"),
    (["--vf-coef", "-1"], "must be zero or more"),
    (["--device", "cuda:7", *SHORT], "--device cuda:7: this machine has"),
    (["--device", "tpu9", *SHORT], "--device tpu9: not a device"),
    (["--model", "some-org/some-vlm"], "cannot be reached"),  # a hub id, no network: at once, not after retries
])
def test_cli_bad_input_is_one_clear_line(argv, message, tmp_path):
    import time
    t0 = time.time()
    r = _run(*argv, "--save-dir", str(tmp_path / "x"), timeout=120)
    assert time.time() - t0 < 60, "a bad flag must be reported at once"
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_corrupt_checkpoint_is_one_clear_line(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "model"
    R.save(model, processor, R.make_value_head(R.text_hidden_size(model)), str(path), {})
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    r = _run("--load", str(path), "--num-updates", "0", "--eval-episodes", "0", "--save-dir", str(tmp_path / "x"),
             timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot load" in lines[0], r.stderr
    assert (path / "rl4vlm.json").exists()  # the folder is left as it was


def test_out_of_gpu_memory_is_one_line_naming_the_flags(monkeypatch, tmp_path):
    args = R.parse_args(["--sft-steps", "0", "--num-updates", "1", "--eval-episodes", "0", "--save-dir", str(tmp_path)])

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(R, "collect_rollout", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        R.cli(args)
    message = str(stop.value)
    assert "\n" not in message and "out of GPU memory" in message
    assert all(f in message for f in ("--micro-batch-size (now 32)", "--num-envs (8)", "--max-new-tokens (96)",
                                      "--gradient-checkpointing"))
    assert not (tmp_path / "model").exists()


def test_rl_leaves_the_vision_tower_as_sft_left_it(tiny, tmp_path):
    model, processor = tiny
    R.save(model, processor, R.make_value_head(R.text_hidden_size(model)), str(tmp_path / "sft"),
           {"task": "numberline", "cot": True})
    r = _run(*_tiny_cli(tmp_path / "rl", "--load", str(tmp_path / "sft"), "--sft-steps", "0", "--num-envs", "4",
                        "--minibatch-size", "8", "--lr", "1e-3"))
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file
    before = load_file(tmp_path / "sft" / "model.safetensors")
    after = load_file(tmp_path / "rl" / "model" / "model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    language = [k for k in before if "language_model" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)  # RL did train the rest


def test_cli_same_seed_repeats_exactly(tmp_path):
    runs = []
    for name in ("a", "b"):
        r = _run(*_tiny_cli(tmp_path / name, "--num-updates", "2", "--seed", "7"))
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [line.split(",") for line in (tmp_path / name / "metrics.csv").read_text().splitlines()]
        timing = [i for i, h in enumerate(rows[0]) if h.startswith("t_") or h == "sps"]
        runs.append([[x for i, x in enumerate(row) if i not in timing] for row in rows])
    assert runs[0] == runs[1] and len(runs[0]) == 3


def _rows(path, *columns):
    """A metrics CSV's columns, as text, row by row."""
    header, *rows = path.read_text().splitlines()
    index = [header.split(",").index(c) for c in columns]
    return [tuple(row.split(",")[i] for i in index) for row in rows]


def _stop_after(cmd, csv, rows, sig, timeout=600):
    """Run cmd; once csv holds `rows` rows, send it sig; -> (return code, stdout + stderr)."""
    import signal
    import time
    # A shell's background job starts with SIGINT ignored, and Python then keeps ignoring it: restore it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while not (csv.exists() and len(csv.read_text().splitlines()) > rows):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the run ended or logged too little: " + proc.communicate()[1][-2000:])
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout + stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_end_and_resume_goes_on_as_a_straight_run(signame, tmp_path):
    """Ctrl-C and SIGTERM (timeout, SLURM, Kubernetes) alike: the run ends its update, saves a resumable
    checkpoint and says where, in results.json too. --resume goes on with the run's own flags: its
    metrics.csv logs updates 1-6 with the env steps, learning rates and every other number of a straight
    run (the optimiser's moments, the RNGs, the environments and the KL reference are all restored)."""
    import signal
    flags = ["--num-updates", "6", "--seed", "3", "--save-every", "0"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _run(*_tiny_cli(straight, *flags)).returncode == 0
    cmd = [sys.executable, os.path.join(HERE, "rl4vlm.py"), *_tiny_cli(stopped, *flags)]
    rc, printed = _stop_after(cmd, stopped / "metrics.csv", 2, getattr(signal, signame))
    assert rc == 128 + getattr(signal, signame) and "Traceback" not in printed, printed[-2000:]
    results = json.loads((stopped / "results.json").read_text())
    step = results["interrupted"]["step"]
    assert 2 <= step < 6 and results["interrupted"]["phase"] == "rl" and not results["finished"]
    assert f"--resume {stopped}" in printed and signame in printed
    assert len(_rows(stopped / "metrics.csv", "update")) == step
    r = _run("--resume", str(stopped))
    assert r.returncode == 0, r.stderr[-2000:]
    numbers = [c for c in R.METRICS if not c.startswith("t_") and c != "sps"]
    assert _rows(stopped / "metrics.csv", *numbers) == _rows(straight / "metrics.csv", *numbers)
    assert [row[0] for row in _rows(stopped / "metrics.csv", "update")] == [str(u) for u in range(1, 7)]
    assert json.loads((stopped / "results.json").read_text())["finished"]
    from safetensors.torch import load_file
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = _run("--resume", str(stopped))
    assert again.returncode != 0 and "has finished" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_a_run_stopped_in_sft_resumes_sft(tmp_path):
    """SIGTERM during SFT: the checkpoint is marked as SFT's, --load of it says so, and --resume finishes
    SFT from the step it stopped at, then RL: the same SFT losses and updates as a straight run."""
    import signal
    flags = ["--sft-steps", "120", "--num-updates", "1", "--seed", "5"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _run(*_tiny_cli(straight, *flags)).returncode == 0
    cmd = [sys.executable, os.path.join(HERE, "rl4vlm.py"), *_tiny_cli(stopped, *flags)]
    rc, printed = _stop_after(cmd, stopped / "sft.csv", 1, signal.SIGTERM)  # step 1 logged
    assert rc == 143, printed[-2000:]
    meta = R.saved_run(str(stopped / "model"))
    assert meta["phase"] == "sft" and 1 <= meta["step"] < 120 and not (stopped / "metrics.csv").exists()
    r = _run("--load", str(stopped), "--num-updates", "0", "--eval-episodes", "1", "--save-dir", str(tmp_path / "x"))
    assert f"stopped in SFT, at step {meta['step']}" in r.stdout + r.stderr
    assert _run("--resume", str(stopped)).returncode == 0
    for name, columns in (("sft.csv", ["step", "loss", "lr"]), ("metrics.csv", ["update", "env_steps", "policy_loss"])):
        assert _rows(stopped / name, *columns) == _rows(straight / name, *columns), name


def test_resume_restores_the_state_saved(tiny, tmp_path):
    """A checkpoint holds what the loop needs: after restore() the policy, the value head, Adam's moments,
    the lr, the KL reference (LoRA too: its reference adapter), the RNGs and the environments are as saved."""
    for lora in (False, True):
        args = R.parse_args(_tiny_cli(tmp_path / f"run{lora}", "--num-updates", "4", "--save-every", "2",
                                      "--lr", "1e-3", "--task", "blackjack"))
        model, base = copy.deepcopy(tiny[0]), str(tmp_path / "base")
        if lora:  # an adapter's checkpoint loads onto its base model, saved on disk
            pytest.importorskip("peft")
            R.save(model, tiny[1], R.make_value_head(R.text_hidden_size(model)), base, {"task": "blackjack", "tiny": True})
            model = R.add_lora(model, 4)
        agent = _agent(model, tiny[1], R.make_value_head(R.text_hidden_size(model)))
        agent.base_model = base if lora else "tiny"
        agent.ref = R.make_reference(agent.model)
        with torch.no_grad():  # a policy that has moved away from its reference
            for p in agent.model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        optimizer = R.rl_optimizer(agent, args)
        for group in optimizer.param_groups:
            group["lr"] = 3e-4
        run, rng = R.open_run(args), random.Random(4)
        pool = envs.EnvPool("blackjack", [envs.episode_seed("rollout", i, 1) for i in range(2)])
        rollout = R.collect_rollout(agent, pool, R.generation_config(agent.model, agent.processor, args), args, rng,
                                    R.make_timer()[0])
        adv, ret = R.compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                                 rollout.final_values, rollout.last_values, 0.9, 0.95)
        R.ppo_update(agent, optimizer, rollout, adv, ret, args, rng)
        run.env_steps = 4
        R.checkpoint(agent, args, run, "rl", 2, optimizer, rng, pool)  # --save-every 2
        saved = {"params": {n: p.detach().clone() for n, p in agent.model.named_parameters()},
                 "ref": R.reference_state(agent), "opt": copy.deepcopy(optimizer.state_dict()),
                 "rng": rng.random(), "torch": torch.rand(3), "deal": pool.envs[0].np_random.random()}
        resumed = R.parse_args(["--resume", str(tmp_path / f"run{lora}")])
        assert vars(resumed) == {**vars(args), "resume": str(tmp_path / f"run{lora}")}
        again = R.build_agent(resumed, torch.device("cpu"))
        run2, rng2 = R.open_run(resumed), random.Random(0)
        optimizer2 = R.rl_optimizer(again, resumed)
        again.ref = R.make_reference(again.model)
        step, pool2 = R.restore(again, run2, "rl", optimizer2, rng2, None)
        assert (step, run2.env_steps) == (2, 4)
        params = dict(again.model.named_parameters())
        assert all(torch.equal(p, params[n]) for n, p in saved["params"].items())
        assert all(torch.equal(v, R.reference_state(again)[k]) for k, v in saved["ref"].items())
        if lora:
            import peft
            policy = peft.get_peft_model_state_dict(again.model, adapter_name="default")
        else:
            policy = again.model.state_dict()
        assert not all(torch.equal(v, policy[k]) for k, v in saved["ref"].items())  # the reference is not the policy
        moments = optimizer2.state_dict()
        assert moments["param_groups"][0]["lr"] == 3e-4
        assert all(torch.equal(moments["state"][i]["exp_avg_sq"], s["exp_avg_sq"]) for i, s in saved["opt"]["state"].items())
        assert (rng2.random(), pool2.envs[0].np_random.random()) == (saved["rng"], saved["deal"])
        assert torch.equal(torch.rand(3), saved["torch"])


@pytest.mark.parametrize("argv, message", [
    (["--resume", "X", "--lr", "1"], "--resume goes on with the run's own flags; drop --lr"),
    (["--resume", "/no/such/run"], "no checkpoint to resume"),
    (["--save-dir", "FILE"], "is a file, not a folder"),
    (["--save-dir", "RUN"], "holds a run (metrics.csv): --resume"),
])
def test_run_folders_never_mix(argv, message, tmp_path):
    """A run into a folder that holds a run is refused in one line naming --resume and --overwrite, which
    replaces it; a file is no folder; --resume takes no new flags but --device, --save-every, --track."""
    (tmp_path / "FILE").write_text("")
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "metrics.csv").write_text("update\n1\n")
    (tmp_path / "X" / "model").mkdir(parents=True)
    (tmp_path / "X" / "model" / "rl4vlm.json").write_text(json.dumps({"args": vars(R.parse_args([]))}))
    argv = [str(tmp_path / a) if a in ("X", "FILE", "RUN") else a for a in argv]
    r = _run(*argv, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    if "holds a run" in message:
        assert "--overwrite replaces it" in lines[0]
        r = _run(*_tiny_cli(tmp_path / "RUN", "--overwrite"))
        assert r.returncode == 0 and len((tmp_path / "RUN" / "metrics.csv").read_text().splitlines()) == 2


def test_track_writes_tensorboard_events(tmp_path):
    """--track: every metric of every update, the SFT loss, the evaluations, the reading probe and the
    flags go to TensorBoard event files in the run's folder, read back offline."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    r = _run(*_tiny_cli(tmp_path / "run", "--num-updates", "2", "--eval-episodes", "1", "--track"))
    assert r.returncode == 0, r.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {f"rl/{m}" for m in R.METRICS[2:]} <= set(scalars)
    assert {"sft/loss", "eval/success", "reading/current number"} <= set(scalars)
    assert [e.step for e in events.Scalars("rl/lr")] == [4, 8]  # env steps
    rows = _rows(tmp_path / "run" / "metrics.csv", "lr")
    assert [round(e.value, 9) for e in events.Scalars("rl/lr")] == [float(v) for (v,) in rows]
    assert "flags" in " ".join(events.Tags()["tensors"])


# --- rl4vlm.py: many processes (torchrun, gloo, one thread each)

DDP_RUN = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import rl4vlm as R
out = sys.argv[2]


def keep(name, agent):  # each process writes down its trainable weights (the value head's too)
    params = list(agent.model.named_parameters()) + list(agent.value_head.named_parameters())
    torch.save({n: p.detach().clone() for n, p in params if p.requires_grad}, f"{out}/{name}-{R.RANK}.pt")


sft, ppo_update = R.sft, R.ppo_update
R.sft = lambda agent, args, run: (sft(agent, args, run), keep("sft", agent))
R.ppo_update = lambda agent, *a: (ppo_update(agent, *a), keep("ppo", agent))[0]
sys.exit(R.cli(R.parse_args(sys.argv[3:])))
"""


def _torchrun(script, *argv, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), HERE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=HERE, env=env)


def test_two_processes_train_one_policy(tmp_path):
    """torchrun --nproc_per_node 2: after SFT steps and a PPO update every trainable parameter is bitwise
    the same in both processes; process 0 alone logs and writes; env steps count both processes';
    the evaluation's fixed episodes are split between them and gathered (5: 3 + 2); the saved model
    loads and evaluates in one process."""
    script, out = tmp_path / "run.py", tmp_path / "out"
    script.write_text(DDP_RUN)
    out.mkdir()
    proc = _torchrun(script, str(out), *_tiny_cli(out / "run", "--task", "ezpoints", "--num-updates", "1",
                                                  "--eval-episodes", "5"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    for name in ("sft", "ppo"):
        mine, theirs = torch.load(out / f"{name}-0.pt"), torch.load(out / f"{name}-1.pt")
        assert mine.keys() == theirs.keys() and len(mine) > 20
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not all(torch.equal(v, torch.load(out / "sft-0.pt")[k]) for k, v in torch.load(out / "ppo-0.pt").items())
    rows = (out / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[1] == "8"  # 2 processes x 2 envs x 2 steps
    results = json.loads((out / "run" / "results.json").read_text())
    assert results["start"]["episodes"] == results["final"]["episodes"] == 5
    logged = stdout + stderr
    assert logged.count("update 1/1 |") == 1 and logged.count("sft done") == 1 and "Traceback" not in logged
    model, processor, value_state, meta = R.load_checkpoint(str(out / "run" / "model"), "cpu")  # in one process
    ppo = torch.load(out / "ppo-0.pt")
    assert all(torch.equal(p, ppo[n]) for n, p in model.named_parameters() if n in ppo) and meta["env_steps"] == 8
    args = R.parse_args(["--task", "ezpoints", "--num-envs", "2", "--max-new-tokens", "8"])
    assert R.evaluate(_agent(model, processor), args, 3)["episodes"] == 3


DDP_GRADIENT = """
import copy, os, random, sys, torch
sys.path.insert(0, sys.argv[1])
import rl4vlm as R
from test_rl4vlm import _samples
torch.manual_seed(0)
args = R.parse_args(["--task", "numberline", "--update-epochs", "1", "--minibatch-size", "4", "--micro-batch-size", "2",
                     "--max-grad-norm", "1e9", "--kl-coef", "1", "--seed", "3"])
device = R.init_distributed(args)
agent = R.build_agent(args, device)
R.freeze_vision(agent.model)
agent.ref = copy.deepcopy(agent.model)
with torch.no_grad():
    for p in agent.ref.parameters():
        p.add_(0.02 * torch.randn_like(p))  # a reference the policy is not: the KL term has a gradient
samples = _samples(agent.model.eval(), agent.processor, n=4, seed=10 + 4 * R.RANK, task="numberline")
with torch.no_grad():
    old_lp, old_v, _ = R.score(agent.model, agent.value_head, R.collate(samples, agent.processor.tokenizer.pad_token_id,
                                                                          "cpu"), 0.2, 0.5)
adv = torch.tensor([1.0, -2.0, 0.5, 0.2]) * (R.RANK + 1)


def rollout(samples, lp, v):
    return R.Rollout(samples, lp, v, *[None] * 5, finished=[], invalid=[])


def gradient(agent, *update):  # the gradient each optimiser step applies
    grads = []
    opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad] + list(agent.value_head.parameters()), lr=0.0)
    step = opt.step
    opt.step = lambda: grads.append(torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                                               for g in opt.param_groups for p in g["params"]])) or step()
    R.ppo_update(agent, opt, *update, args, random.Random(0))
    return grads[0]


every = R.gather([(s, lp, v, a) for s, lp, v, a in zip(samples, old_lp.tolist(), old_v.tolist(), adv.tolist())])
if R.RANK == 0:  # one process, on both processes' samples at once
    single = copy.deepcopy(agent)
    R.WORLD, args.minibatch_size = 1, 8
    s, lp, v, a = zip(*every)
    expected = gradient(single, rollout(list(s), torch.tensor(lp), torch.tensor(v)), torch.tensor(a), torch.tensor(v) + torch.tensor(a))
    R.WORLD, args.minibatch_size = 2, 4
got = gradient(agent, rollout(samples, old_lp, old_v), adv, old_v + adv)
bad = old_lp.clone()
bad[0] = float("nan") if R.RANK == 1 else bad[0]  # a non-finite loss in process 1 only
try:
    gradient(agent, rollout(samples, bad, old_v), adv, old_v + adv)
    stopped = ""
except FloatingPointError as e:  # in both processes, at the same step: neither waits for the other
    stopped = str(e)
if R.RANK == 0:
    print("max difference", (got - expected).abs().max().item(), "largest", expected.abs().max().item())
    torch.save((got, expected, stopped), sys.argv[2])
torch.distributed.barrier()  # both finish before either tears down: a process that exits while the other
torch.distributed.destroy_process_group()  # still holds the group can abort in gloo's teardown (seen in CI)
"""


def test_two_processes_apply_the_gradient_of_one_process_on_all_samples(tmp_path):
    """Each process has 4 samples; the gradient an optimiser step applies (advantages normalised over all 8,
    the KL term, the value head) equals one process's on the 8 samples. A non-finite loss in one process
    stops the update in both."""
    script = tmp_path / "grad.py"
    script.write_text(DDP_GRADIENT)
    proc = _torchrun(script, str(tmp_path / "grads.pt"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    got, expected, stopped = torch.load(tmp_path / "grads.pt")
    assert got.abs().max() > 1e-3 and torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert stopped == "a loss is not finite in another process"


@pytest.mark.parametrize("who", ["SIGINT to process 1", "SIGTERM to torchrun"])
def test_a_signal_stops_every_process_at_one_update_with_a_checkpoint(who, tmp_path):
    """Ctrl-C in one process, or SIGTERM to torchrun (what SLURM and Kubernetes send): every process ends
    the same update, process 0 saves one resumable checkpoint, nothing waits for a timeout; --resume under
    torchrun goes on from it."""
    import signal
    import time
    script, out = tmp_path / "run.py", tmp_path / "out"
    script.write_text(DDP_RUN)
    out.mkdir()
    proc = _torchrun(script, str(out), *_tiny_cli(out / "run", "--num-updates", "8"))
    deadline = time.time() + 600
    while not ((out / "run" / "metrics.csv").exists() and len((out / "run" / "metrics.csv").read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("no update logged: " + proc.communicate()[1][-2000:])
        time.sleep(0.1)
    if who.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        ranks = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read()
                environ = open(f"/proc/{pid}/environ").read().split("\0")
            except OSError:
                continue
            if str(script) in cmdline and "torch.distributed.run" not in cmdline:
                ranks[next(e for e in environ if e.startswith("RANK="))] = int(pid)
        os.kill(ranks["RANK=1"], signal.SIGINT)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and proc.returncode != 0
    # torchrun reports a worker's non-zero exit (and its own SIGTERM) with a traceback of its own code
    assert 'rl4vlm.py", line' not in stdout + stderr and f'{script}", line' not in stdout + stderr, stderr[-3000:]
    assert (stdout + stderr).count("--resume") == 1, stderr[-3000:]
    results = json.loads((out / "run" / "results.json").read_text())
    step = results["interrupted"]["step"]
    state = torch.load(out / "run" / "model" / "state.pt", weights_only=False)
    assert (state["world"], state["step"], len(state["ranks"])) == (2, step, 2) and 1 <= step < 8
    assert len((out / "run" / "metrics.csv").read_text().splitlines()) == step + 1
    resumed = _torchrun(script, str(out), "--resume", str(out / "run"))
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"update {step + 1}/8" in stdout + stderr and "update 8/8" in stdout + stderr  # from the checkpoint
    assert len((out / "run" / "metrics.csv").read_text().splitlines()) == 9


# --- rl4vlm.py: saving and loading

def test_save_then_load_gives_the_same_logits(tiny, tmp_path):
    model, processor = tiny
    model.eval()
    vh = R.make_value_head(R.text_hidden_size(model))
    path = str(tmp_path / "model")
    R.save(model, processor, vh, path, {"task": "numberline", "cot": True, "base_model": "tiny"})
    samples = _samples(model, processor, n=2, seed=4)
    loaded, lproc, value_state, meta = R.load_checkpoint(path, "cpu")
    lvh = R.make_value_head(R.text_hidden_size(loaded))
    lvh.load_state_dict(value_state)
    loaded.eval()
    assert meta["task"] == "numberline"
    with torch.no_grad():
        a = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
        b = R.score(loaded, lvh, R.collate(samples, lproc.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the loaded processor makes the same inputs
    pool = envs.EnvPool("ezpoints", range(2))
    x = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    y = R.process(lproc, R.prompts(pool, True), pool.obs, "cpu")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_failed_save_keeps_the_last_good_model(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    vh = R.make_value_head(R.text_hidden_size(model))
    path = str(tmp_path / "model")
    R.save(model, processor, vh, path, {"mark": "good"})

    def broken_save(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        R.save(model, processor, vh, path, {"mark": "new"})
    monkeypatch.undo()
    _, _, _, meta = R.load_checkpoint(path, "cpu")
    assert meta["mark"] == "good"


def test_lora_checkpoint_resumes_as_lora(tiny, tmp_path):
    """A LoRA run saves an adapter; resuming it without --lora still trains the adapter and saves it as one."""
    pytest.importorskip("peft")
    model, processor = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    r = _run(*_tiny_cli(tmp_path / "a", "--model", str(base), "--lora", "--lora-rank", "4"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "a" / "model" / "adapter_config.json").exists()
    r = _run(*_tiny_cli(tmp_path / "b", "--load", str(tmp_path / "a" / "model"), "--sft-steps", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, _, _, meta = R.load_checkpoint(str(tmp_path / "b" / "model"), "cpu")
    assert meta["lora"] is True and meta["base_model"] == str(base)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_lora_run_from_a_relative_folder_loads_from_anywhere(tiny, tmp_path, monkeypatch):
    """rl4vlm.json's base_model was the --model argument as typed: a relative folder, which a LoRA adapter
    could not find once loaded from another directory."""
    pytest.importorskip("peft")
    model, processor = tiny
    (tmp_path / "work").mkdir()
    model.save_pretrained(tmp_path / "work" / "base")
    processor.save_pretrained(tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    args = R.parse_args(_tiny_cli("run", "--model", "base", "--lora", "--lora-rank", "4", "--num-updates", "0"))
    assert R.main(args) == 0
    monkeypatch.chdir(tmp_path)
    loaded, _, _, meta = R.load_checkpoint(str(tmp_path / "work" / "run" / "model"), "cpu")
    assert meta["base_model"] == str(tmp_path / "work" / "base") and meta["lora"]


# --- rl4vlm.py: every VLM family through one code path, each on a tiny random-weight copy

ARCHS = list(R.TINY_ARCHS)  # llava, llava-next, qwen2-vl, qwen2.5-vl, qwen3-vl, idefics3, gemma3


@pytest.fixture(scope="module", params=ARCHS)
def family_model(request):
    torch.manual_seed(0)
    arch = request.param
    model, processor = R.build_tiny(arch, "mini")
    assert model.config.model_type == R.TINY_ARCHS[arch]
    return model.eval(), processor


def test_family_batched_scoring_equals_one_at_a_time(family_model):
    """Each family's own image layout (Qwen's concatenated patches and grid, LLaVA-NeXT's tiles and
    image sizes, Idefics3's pixel mask, Gemma's token types) is cut per sample and joined again."""
    model, processor = family_model
    samples = _samples(model, processor, n=3, seed=1, max_new_tokens=6)
    image = samples[0]["image"]
    rows = int(image["image_grid_thw"].prod()) if "image_grid_thw" in image else 1  # Qwen: the sample's patches
    assert all(len(v) == (rows if k == "pixel_values" else 1) for k, v in image.items())
    _assert_batched_equals_single(model, processor, samples)


def test_family_rollout_logprobs_and_values_equal_scoring(family_model):
    """The rollout's old log pi and V(s) from generate equal the scoring forward's: the model's own
    positions (Qwen's 3-D RoPE: the hand-made 1-D positions this code passed before were off by up to
    1.2e-2 per token on the tiny Qwen2.5-VL and 0.36 on the tiny Qwen3-VL; this test failed for all three Qwens)."""
    model, processor = family_model
    vh = R.make_value_head(R.text_hidden_size(model))
    pool = envs.EnvPool("ezpoints", range(3, 6))
    for i, env in enumerate(pool.envs):  # formulas of different lengths: a left-padded batch
        for _ in range(i):
            pool.obs[i], _, _, _, pool.infos[i] = env.step(env.expert_action())
    inputs = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1
    torch.manual_seed(0)
    responses, token_logp, hidden = R.generate(model, inputs, R.generation_config(
        model, processor, R.parse_args(["--max-new-tokens", "12", "--temperature", "0.7"])))
    samples = [R.make_sample(inputs, i, responses[i], processor.tokenizer) for i in range(3)]
    with torch.no_grad():
        from_generate = R.lambda_log_pi(token_logp, *R.answer_masks(samples, token_logp.shape[1]), 0.5)
        log_pi, value, _ = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.7, 0.5)
        assert torch.allclose(vh(hidden)[:, 0], value, atol=1e-5)
    assert (from_generate - log_pi).abs().max() < 1e-4 and (from_generate < -1).all()


def test_family_save_then_load_gives_the_same_logits(family_model, tmp_path):
    """save() then load_checkpoint(): the same processor inputs and identical scores; the folder has a real
    checkpoint's layout (the stock processor class's name, also for an image-only processor)."""
    model, processor = family_model
    vh = R.make_value_head(R.text_hidden_size(model))
    R.save(model, processor, vh, str(tmp_path / "m"), {"base_model": "tiny"})
    saved = json.loads((tmp_path / "m" / "processor_config.json").read_text())["processor_class"]
    assert saved == type(processor).__name__ and issubclass(type(processor), getattr(__import__("transformers"), saved))
    loaded, lproc, _, _ = R.load_checkpoint(str(tmp_path / "m"), "cpu")
    loaded.eval()
    pool = envs.EnvPool("blackjack", range(2))
    x = R.process(processor, R.prompts(pool, True), pool.obs, "cpu")
    y = R.process(lproc, R.prompts(pool, True), pool.obs, "cpu")
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    samples = _samples(model, processor, n=2, seed=4, max_new_tokens=6)
    with torch.no_grad():
        a = R.score(model, vh, R.collate(samples, processor.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
        b = R.score(loaded, vh, R.collate(samples, lproc.tokenizer.pad_token_id, "cpu"), 0.2, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_family_lora_and_rl_leave_the_vision_encoder_alone(family_model):
    """LoRA wraps the language model's projections only; RL freezes exactly the vision encoder
    (CLIP/SigLIP towers, Qwen's `visual`, Idefics3's `vision_model`), nothing of the language model."""
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(family_model[0])
    R.freeze_vision(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    vision = {n for n, _ in model.named_parameters() if re.search(r"vision|visual", n)}
    assert frozen and frozen == vision
    wrapped = R.add_lora(copy.deepcopy(family_model[0]), rank=4)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * model.config.get_text_config().num_hidden_layers  # A and B, 7 projections
    assert all("lora_" in n and not re.search(r"vision|visual", n) for n in trainable)
    assert isinstance(wrapped, peft.PeftModel)


@pytest.mark.parametrize("arch", ARCHS[1:])  # the tiny LLaVA: test_cli_short_run_writes_metrics_and_model and others
def test_family_cli_trains_saves_and_loads(arch, tmp_path):
    """--tiny-arch ARCH: SFT steps and a PPO update, saved; then LoRA on that model, saved as an adapter;
    both load back. (The second run calls main() in-process: the same code, without 3 s of imports.)"""
    pytest.importorskip("peft")
    r = _run(*_tiny_cli(tmp_path / "full", "--tiny-arch", arch))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "full" / "metrics.csv").read_text().splitlines()) == 2
    full = str(tmp_path / "full" / "model")
    assert R.main(R.parse_args(_tiny_cli(tmp_path / "lora", "--model", full, "--lora", "--lora-rank", "4",
                                         "--sft-steps", "1"))) == 0
    model, _, _, meta = R.load_checkpoint(full, "cpu")
    assert model.config.model_type == R.TINY_ARCHS[arch]
    lora, _, _, meta = R.load_checkpoint(str(tmp_path / "lora" / "model"), "cpu")
    assert meta["lora"] and meta["base_model"] == full and lora.config.model_type == R.TINY_ARCHS[arch]
    changed = [n for n, p in lora.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed  # LoRA's B starts at zero: SFT and PPO trained the adapter


def _qwen_checkpoint_folder(path):
    """A folder in Qwen/Qwen2.5-VL-3B-Instruct's layout: config.json, preprocessor_config.json naming
    Qwen2_5_VLProcessor and Qwen2VLImageProcessor (min/max pixels), chat_template.json, and a byte-level
    BPE trained on text unrelated to the tasks (Python's module docstrings) with Qwen's special tokens,
    no image_token attribute and its chat format. Tiny random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    texts = [m.__doc__ for m in (re, json, random, subprocess, os, copy, warnings) if m.__doc__]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|>"
        "<|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 112 * 112, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)
    from tools.tiny import TINY_RECIPES
    config = AutoConfig.for_model("qwen2_5_vl", **TINY_RECIPES["qwen2_5_vl"]["config"](32, 1, text, tok))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    return tok


def test_a_qwen_checkpoint_folder_trains_with_model_path(tmp_path):
    """--model FOLDER of a real Qwen2.5-VL checkpoint's layout loads image-only (no torchvision here),
    prompts in Qwen's chat format, and trains (SFT, a PPO update), saves and loads back."""
    folder = tmp_path / "Qwen2.5-VL-tiny"
    folder.mkdir()
    tok = _qwen_checkpoint_folder(folder)
    assert not (folder / "processor_config.json").exists()
    model, processor = R.load_vlm(str(folder), "cpu")
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.tokenizer.padding_side == "left"
    text = R.chat_texts(processor, ["Hi"])[0]
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    inputs = R.process(processor, ["Hi"], [envs.make("numberline").reset(seed=0)[0]], "cpu")
    assert (inputs["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 16  # 112 px, 2x2 merged
    r = _run(*_tiny_cli(tmp_path / "run", "--model", str(folder), "--eval-episodes", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, lproc, _, meta = R.load_checkpoint(str(tmp_path / "run" / "model"), "cpu")
    assert meta["base_model"] == str(folder) and type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert torch.equal(R.process(lproc, ["Hi"], [envs.make("numberline").reset(seed=0)[0]], "cpu")["input_ids"],
                       inputs["input_ids"])


def test_a_folder_without_an_image_processor_is_one_clear_line(tiny, tmp_path):
    """AutoProcessor silently gives a bare tokenizer for a processor class it does not know (here, as an
    unregistered image-only subclass would have saved it): one line, not a failure later."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**saved, "processor_class": "LlavaImageOnlyProcessor"}))
    r = _run("--model", str(tmp_path), "--num-updates", "0", "--eval-episodes", "0", "--save-dir", str(tmp_path / "x"),
             timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(lines) == 1 and "no image processor" in lines[0] and "Tokenizer" in lines[0], r.stderr


def test_a_family_this_code_cannot_train_is_refused_in_one_line(tmp_path):
    """PaliGemma would need token_type_ids 1 over the answer: refused before anything loads."""
    from transformers import AutoConfig
    AutoConfig.for_model("paligemma").save_pretrained(tmp_path)
    with pytest.raises(R.LoadError, match="not supported: PaliGemma's token_type_ids"):
        R.load_vlm(str(tmp_path), "cpu")


def test_gpu_check_runs_shrunk_on_a_cpu(tmp_path):
    """tools/gpu_check.py --shrink: folders in llava-v1.6-mistral-7b's, Qwen2.5-VL-7B's and -3B's hub layout
    (real vocabularies, token ids, image processors, chat templates, Qwen's generation_config.json) with
    small layers, each trained by the README's real-model command for an SFT step and 2 PPO updates: the
    7B shapes with LoRA, the 3B fully fine-tuned in 16 bits (fp32 weights, bf16 compute)."""
    pytest.importorskip("peft")
    r = subprocess.run([sys.executable, os.path.join(HERE, "tools", "gpu_check.py"), "--shrink", "--out", str(tmp_path),
                        "--sft-steps", "1", "--num-steps", "1", "--flags", "--lora-rank 8 --num-envs 1 --sft-batch-size 1 "
                        "--max-new-tokens 8 --minibatch-size 1 --micro-batch-size 1"],
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| llava-hf/") or line.startswith("| Qwen/")]
    assert len(rows) == 3 and all("(shrunk)" in row for row in rows) and "full, fp32 weights, bf16 compute" in rows[2]
    for name, vocab, image_token, special, ends in (("llava-next", 32064, "<image>", 32000, [2]),
                                                    ("qwen2.5-vl", 152064, "<|image_pad|>", 151655, [151643, 151645])):
        model, processor = R.load_vlm(str(tmp_path / name), "cpu")
        assert model.config.get_text_config().vocab_size == vocab
        assert processor.tokenizer.convert_tokens_to_ids(image_token) == special
        assert R.end_tokens(model, processor.tokenizer) == ends
        assert model.generation_config.repetition_penalty is None  # Qwen's 1.05 is not sampled with
        assert (tmp_path / f"run-{name}" / "model" / "adapter_config.json").exists()
    full = json.loads((tmp_path / "run-qwen2.5-vl-3b" / "results.json").read_text())["args"]  # fully fine-tuned
    assert full["dtype"] == "bfloat16" and not full["lora"]
    assert (tmp_path / "run-qwen2.5-vl-3b" / "model" / "model.safetensors").exists()


# --- tools/walkthrough.py: the method on one example, step by step

WALKTHROUGH = os.path.join(HERE, "tools", "walkthrough.py")


def _walkthrough(monkeypatch, capsys, *argv):
    """Run tools/walkthrough.py in this process, as `python tools/walkthrough.py ARGV` would -> its globals and
    what it printed."""
    monkeypatch.setattr(sys, "argv", [WALKTHROUGH, *argv])
    stdout = sys.stdout
    try:
        ns = runpy.run_path(WALKTHROUGH, run_name="__main__")
    finally:
        sys.stdout = stdout  # --markdown stands in for it while the cells run
    return ns, capsys.readouterr().out


def _numbers(line):
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]\d+)?", line)]


def test_walkthrough_prints_what_rl4vlm_computes_and_writes_its_page(tmp_path, monkeypatch, capsys):
    """tools/walkthrough.py --fast runs every cell, and what it prints is what rl4vlm.py's functions return on
    its tensors: the image tokens, the masks, log pi at each lambda, V(s) at the last prompt token, GAE, and
    one PPO step (ratios 1 before it; after it the clipped fraction and the clipped policy loss). Its page
    holds every section, the printed output and the pictures, and no hidden cell; every command under
    "things to try" parses. A second run reuses the model, and without matplotlib says so in one line."""
    page, run_dir = tmp_path / "page" / "walkthrough.md", str(tmp_path / "run")
    ns, out = _walkthrough(monkeypatch, capsys, "--fast", "--run-dir", run_dir, "--markdown", str(page))
    lines = out.splitlines()
    tok, args = ns["tok"], ns["args"]

    # 1. the prompt: 64 image tokens (8 x 8 patches), one run right after "USER: "
    ids = ns["inputs"]["input_ids"][0]
    assert (ids == ns["model"].config.image_token_id).sum() == 64
    assert f"{len(ids)} prompt tokens, 64 of them the image token '<image>'" in out and "at positions 1..64" in out
    assert "\n[1..64] '<image>' x 64\n" in out
    # 2. the answers with no action or two: None, and a random legal action, both about half the time
    assert "'{\"action\": \"+\"} {\"action\": \"-\"}') -> None" in out
    played = next(x for x in lines if x.startswith("choose_actions on 1000"))
    assert "invalid 1000 times" in played and all(400 < n < 600 for n in map(int, re.findall(r"' (\d+)", played)))
    # 3. the masks: disjoint; the demonstration's action tokens read '"action": "-"}'; no action: all thoughts
    thought_mask, action_mask, answers = ns["thought_mask"], ns["action_mask"], ns["answers"]
    assert not (thought_mask * action_mask).any()
    start = R.action_start(tok, answers[1])
    assert action_mask[1].nonzero()[0, 0] == start
    assert tok.decode(answers[1][start:], skip_special_tokens=True).strip() == '"action": "-"}'  # the wrong way
    assert action_mask[2].sum() == 0 and thought_mask[2].sum() == len(answers[2])
    # 4. log pi at lambda 0.5 as printed is lambda_log_pi's, and the hand sum of the masked log-probs
    logp = ns["logp"]
    line = next(x for x in lines if x.startswith("log pi of the sampled answer at lambda 0.5: "))
    printed = _numbers(line.split(": ")[1])[0]
    want = R.lambda_log_pi(logp, thought_mask, action_mask, 0.5)[0].item()
    hand = 0.5 * (logp[0] * thought_mask[0]).sum().item() + (logp[0] * action_mask[0]).sum().item()
    assert printed == pytest.approx(want, rel=1e-6, abs=1e-7) and printed == pytest.approx(hand, rel=1e-5, abs=1e-6)
    for row in lines[lines.index(next(x for x in lines if x.startswith("answer "))) + 1:][:3]:
        _, thoughts, _, action, lam0, lam05, lam1 = _numbers(row)  # token counts and sums, log pi at 0, 0.5, 1
        assert lam0 == pytest.approx(action, rel=1e-3) and lam1 == pytest.approx(thoughts + action, rel=1e-3, abs=1e-6)
        assert lam05 == pytest.approx(0.5 * thoughts + action, rel=1e-3, abs=1e-6)
    # 5. V(s) is read at the last prompt column, the same for the three answers and in generate's own forward
    P = ns["P"]
    assert f"V reads column P - 1 = {P - 1}, the token {tok.decode(ids[-1:])!r}" in out
    values = _numbers(next(x for x in lines if x.startswith("V(s) of the three rows")))
    assert len(values) == 4 and max(values) - min(values) < 1e-4
    # 6. GAE with the paper's gamma and lambda; the table's return is advantage + V; the last step by hand
    assert (args.gamma, args.gae_lambda) == (0.9, 0.95)
    rollout, advantages, e = ns["rollout"], ns["advantages"], ns["e"]
    assert rollout.rewards.shape == advantages.shape == (ns["T"], ns["N"]) == (3, 2)
    table = lines[lines.index(next(x for x in lines if x.startswith(" t  current"))) + 1:][:ns["T"]]
    for t, row in enumerate(table):
        v, a, ret = _numbers(row)[-3:]
        assert a == pytest.approx(advantages[t, e].item(), abs=1e-4) and ret == pytest.approx(a + v, abs=2e-4)
    by_hand = next((x for x in lines if x.startswith("by hand")), None)
    if by_hand:
        assert _numbers(by_hand)[-1] == pytest.approx(advantages[-1, e].item(), abs=1e-4)
    # 7. PPO: ratios 1 before the step, one Adam step, then the clipped fraction and loss as printed
    ratio_before, ratio_after = ns["ratio_before"], ns["ratio_after"]
    assert (ratio_before - 1).abs().max() < 1e-4
    assert all(abs(x - 1) < 1e-4 for x in _numbers(next(x for x in lines if x.startswith("ratios before"))))
    assert "KL term 1.0 * 0.0000 | clipped fraction 0.00" in out  # pi is still pi_SFT
    assert {s["step"].item() for s in ns["optimizer"].state.values()} == {1}
    assert (ratio_after - 1).abs().max() > 1e-4  # the step moved the policy
    after = next(x for x in lines if x.startswith("after one step"))
    clipped = ((ratio_after - 1).abs() > args.clip_coef).float().mean().item()
    assert f"clipped fraction {clipped:.2f}" in after
    line = next(x for x in lines if x.startswith("policy loss = mean of max(-A * r, -A * clip(r))"))
    assert float(line.split(" = ")[-1].split(";")[0]) == pytest.approx(ns["after"]["policy_loss"], abs=1e-4)
    assert f"policy {ns['after']['policy_loss']:.4f}" in next(x for x in lines if x.startswith("loss terms now"))
    rows = lines[lines.index(line) + 2:][:min(10, len(ratio_after))]  # the ratios furthest from 1, first
    adv, low, high = ns["adv"], 1 - args.clip_coef, 1 + args.clip_coef
    furthest = (ratio_after - 1).abs().argsort(descending=True)[:len(rows)].tolist()
    assert [int(row.split()[0]) for row in rows] == furthest
    for i, row in zip(furthest, rows):
        a, r = adv[i].item(), ratio_after[i].item()
        assert _numbers(row)[1:3] == pytest.approx([a, r], abs=1e-3)
        assert row.endswith("none: clipped") == ((a > 0 and r > high) or (a < 0 and r < low))

    # the page: every section with its output and pictures, no hidden cell; "things to try" parses
    text = page.read_text()
    for title in ["## 0.", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## Things to try"]:
        assert title in text
    assert text.count("```") % 2 == 0 and "class Page" not in text and "def draw_tokens" not in text
    for x in (by_hand or after, after, "choose_actions on 1000 copies"):
        assert x in text
    for name in ("numberline.png", "tokens.png"):
        assert f"![](walkthrough/{name})" in text
        assert (page.parent / "walkthrough" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    commands = [x.split("#")[0] for x in text.splitlines() if x.startswith("python rl4vlm.py")]
    assert len(commands) == 7 and any("--no-cot" in x for x in commands) and any("--lora" in x for x in commands)
    for command in commands:
        R.parse_args(shlex.split(command)[2:])  # a flag that no longer exists exits here

    # again, without matplotlib: the trained model is reused, and the token picture skipped in one line
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page2 = tmp_path / "page2" / "walkthrough.md"
    ns2, out2 = _walkthrough(monkeypatch, capsys, "--fast", "--run-dir", run_dir, "--markdown", str(page2))
    assert "reusing the model in" in out2 and "rl4vlm.py --task numberline" in out2 and "Traceback" not in out2
    assert out2.count("matplotlib is not installed") == 1
    assert (page2.parent / "walkthrough" / "numberline.png").exists()
    assert not (page2.parent / "walkthrough" / "tokens.png").exists()
    assert "](walkthrough/tokens.png)" not in page2.read_text()
    assert torch.equal(ns2["ratio_before"], ns["ratio_before"])  # the same model and seeds: the same numbers


# --- docs/your_task.md: a task of your own, as the page writes it

def test_the_your_task_page_registers_a_task_that_trains(tmp_path):
    """The page's code, run as written: it registers Colour Match, whose prompt and demonstrations come
    from the class alone; SFT and one PPO update run on it, and its own reading probe reads its field."""
    page = open(os.path.join(HERE, "docs", "your_task.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 2 and "envs.register" in blocks[0]
    import types
    module = sys.modules["colourmatch"] = types.ModuleType("colourmatch")  # as `import colourmatch` makes it
    try:
        exec(blocks[0], module.__dict__)
        env = envs.make("colourmatch")
        check_env(gym.make(envs.env_id("colourmatch")))
        obs, info = env.reset(seed=3)
        assert env.reset(seed=3)[1] == info and env.step(env.expert_action())[1] == 1.0
        prompt = R.build_prompt("colourmatch", env.action_names, info)
        assert prompt.startswith("You are playing Colour Match") and '"colour": ...' in prompt
        assert R.parse_action(R.format_response("colourmatch", info, info["colour"]), env.action_names) == \
            env.action_names.index(info["colour"])
        R.TASK_RECIPES["colourmatch"] = dict(sft_steps=3, num_updates=1)
        args = R.parse_args(["--task", "colourmatch", *SHORT[2:], "--sft-steps", "3", "--save-dir", str(tmp_path)])
        assert R.main(args) == 0
        results = json.loads((tmp_path / "results.json").read_text())
        assert list(results["reading"]) == ["colour"] and len((tmp_path / "metrics.csv").read_text().splitlines()) == 2
    finally:  # the other tests' tiny tokenizers are trained on the paper's four tasks alone
        sys.modules.pop("colourmatch")
        envs.TASKS.pop("colourmatch", None)
        R.TASK_RECIPES.pop("colourmatch", None)


# --- dev/: research probes (not the method; their tests keep them working)

def test_sft_speed_times_sft_and_counts_denormals(tmp_path):
    """dev/sft_speed.py: denormals are counted exactly; a short SFT prints one line per --every steps
    with a positive step time, AdamW time and their ratio, switches flushing on at --flush-from, and
    writes its model where --save-dir says (never over a default run folder)."""
    tool = os.path.join(HERE, "dev", "sft_speed.py")
    s = runpy.run_path(tool)
    tiny = torch.finfo(torch.float32).tiny
    tensors = [torch.tensor([tiny / 4, 0.0, tiny, -tiny / 2, 1.0]), None, torch.zeros(3, dtype=torch.long)]
    assert s["denormals"](tensors) == 2  # tiny / 4 and -tiny / 2; tiny itself is the smallest normal
    r = subprocess.run([sys.executable, tool, "--every", "2", "--flush-from", "2", *SHORT[:6], "--sft-steps", "4",
                        "--save-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("sft_speed step")]
    timed = [x for x in lines if "s a step" in x]
    assert [x.split()[2] for x in timed] == ["2", "4"] and "flushed" in lines[1], lines
    for x in timed:
        step_s, adam_ms, ratio = (float(x.split(key)[1].split()[0]) for key in ("|", "AdamW", "ratio"))
        assert step_s > 0 and adam_ms > 0
        assert abs(ratio - 1000 * step_s / adam_ms) <= 1 + 0.05 * ratio  # the printed values are rounded
    assert (tmp_path / "run" / "model" / "config.json").exists()
    bad = subprocess.run([sys.executable, tool, "--every", "0"], capture_output=True, text=True, cwd=HERE)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("sft_speed.py: error:")




def test_formula_probe_checks_the_thoughts_plan():
    """dev/reading.py: the thoughts' formula: the demos' solves its deal; a wrong sum, a card used twice,
    none, do not."""
    rd = runpy.run_path(PROBES)
    env = envs.make("points24")
    infos = [env.reset(options={"cards": c})[1] for c in (["10", "3", "8", "A"], ["K", "2", "10", "5"])]
    right = [R.format_response("points24", i, "=") for i in infos]
    unsolvable = env.reset(options={"cards": ["A", "A", "A", "A"]})[1]
    assert rd["plan_accuracy"]("points24", right + [R.format_response("points24", unsolvable, "=")],
                               infos + [unsolvable]) == (2 / 3, 2 / 3)
    plan = right[0].split("; ")[1].split(" makes")[0]
    assert plan == "| ( 10 - 1 ) * 8 / 3"  # a start state: the bar, then the whole formula
    wrong = [right[0].replace(plan, "( 10 - 3 ) * 8 / 1"),  # the cards, but 56
             right[0].replace(plan, "( 10 - 1 ) * 8 / 3 / 1"), "not json"]  # 24, but the ace twice
    assert rd["plan_accuracy"]("points24", wrong, [infos[0]] * 3) == (0.0, 1.0)
    assert rd["plan_accuracy"]("blackjack", [], []) is None


def test_reading_probe_checks_that_actions_follow_the_plan():
    """dev/reading.py --play: a step counts as planned when its thoughts' formula solves the cards and
    starts with the formula so far, and as followed when the unit played is that formula's next one."""
    rd = runpy.run_path(PROBES)
    env = envs.make("points24")
    info = env.reset(options={"cards": ["10", "3", "8", "A"]})[1]
    steps = []
    while True:  # the expert's episode: every step planned and followed, "=" included
        name = env.action_names[env.expert_action()]
        steps.append((info, R.format_response("points24", info, name), name))
        info = env.step(env.action_names.index(name))[4]
        if name == "=":
            break
    n = len(steps)
    assert n > 4 and rd["plan_following"]("points24", steps) == {
        "plan solves and continues the formula": 1.0, "of those, the action is its next unit": 1.0}
    first, later = steps[0], steps[2]
    off_plan = (first[0], first[1], "+")  # planned, not followed
    assert later[0]["formula"] == "( 10" and "; ( 10 | - 1 ) * 8 / 3 makes" in later[1]  # the bar: the next unit
    other_start = (later[0], later[1].replace("( 10 | - 1 ) * 8 / 3", "8 * ( 10 - 1 ) / 3"), "-")  # solves, ignores "( 10"
    got = rd["plan_following"]("points24", steps + [off_plan, other_start, (first[0], "not json", "=")])
    assert got == {"plan solves and continues the formula": (n + 1) / (n + 3),
                   "of those, the action is its next unit": n / (n + 1)}


def test_reading_probe_checks_that_numberline_actions_follow_the_thoughts():
    """dev/reading.py --policy on NumberLine: the demonstrations' thoughts relate the numbers right and
    a right move follows them; a wrong move, a wrong relation word, or no action count against."""
    rd = runpy.run_path(PROBES)
    env = envs.make("numberline")
    infos = [env.reset(options={"current": c, "target": t})[1] for c, t in ((5, 1), (0, 3), (2, 4))]
    right = [R.format_response("numberline", i, m) for i, m in zip(infos, "-++")]
    assert "is smaller" in right[0] and "is larger" in right[1]
    assert rd["relation_following"](right, infos) == (1.0, 1.0, collections.Counter())
    wrong_move = R.format_response("numberline", infos[0], "+")  # says smaller, moves up
    wrong_word = right[1].replace("is larger", "is smaller")  # moves up, as it should, against its word
    got = rd["relation_following"]([wrong_move, wrong_word, "not json"], infos)
    assert got == (1 / 3, 0.0, collections.Counter({(5, 1): 1, (2, 4): 1}))


def test_reading_play_counts_numberline_wrong_moves_per_state():
    """dev/reading.py --play on NumberLine: a move counts as wrong by the state it was played in, whatever
    the answer says (a random move after an invalid answer included)."""
    rd = runpy.run_path(PROBES)
    env = envs.make("numberline")
    at = lambda c, t: env.reset(options={"current": c, "target": t})[1]
    steps = [(at(4, 0), "", "-"), (at(4, 0), "", "+"), (at(4, 0), "not json", "+"), (at(1, 3), "", "+"),
             (at(3, 1), "", "+")]
    wrong, seen = rd["wrong_moves"](steps)
    assert wrong == collections.Counter({(4, 0): 2, (3, 1): 1})
    assert seen == collections.Counter({(4, 0): 3, (1, 3): 1, (3, 1): 1})


NUDGE = os.path.join(HERE, "dev", "nudge.py")


def test_nudge_scores_the_action_part_and_teaches_one_state(tiny):
    """dev/nudge.py: its action log-prob is score()'s log pi with the thoughts weighted 0, for every state's
    "+" and "-" answer; one Adam step on a state's right answer raises that answer's log-prob."""
    nd = runpy.run_path(NUDGE)
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    model.eval()
    states = [(4, 0), (1, 3), (5, 2)]
    for move in "+-":
        batch = nd["answers_batch"](processor, states, move)
        with torch.no_grad():
            got = nd["action_logp"](model, batch)
            want = R.score(model, R.make_value_head(R.text_hidden_size(model)), batch, 0.2, 0.0)[0]
        assert got.shape == (3,) and torch.allclose(got, want, atol=1e-5)
        assert (batch["action_mask"].sum(1) > 0).all() and (batch["thought_mask"].sum(1) > 0).all()
    teach = nd["answers_batch"](processor, [(4, 0)], "-")
    before = nd["action_logp"](model, teach).item()
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    (-nd["action_logp"](model, teach).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        assert nd["action_logp"](model, teach).item() > before
    for argv, message in ((["/no/such/folder"], "model folder not found"),
                          ([HERE, "--state", "3", "3"], "two different")):
        r = subprocess.run([sys.executable, NUDGE, *argv], capture_output=True, text=True, cwd=HERE)
        assert r.returncode == 1 and r.stderr.startswith("nudge.py: error:") and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_reading_probe_blackjack_states():
    """dev/reading.py --policy's states: every two-card hand (hard 5-20, soft A2-A9) against every
    up-card, as the env deals them, with the expert's choice (hit 12 against a 2 or a 7, stand 13
    against a 6, 17 up; hit soft 17 against a 9, stand soft 18 against a 2)."""
    rd = runpy.run_path(PROBES)
    states = rd["blackjack_states"]()
    assert len(states) == (16 + 8) * 13 and len({(h, r) for h, r, _, _, _ in states}) == len(states)
    expert = {(h, r): a for h, r, _, _, a in states}
    for hand, rank, obs, info, _ in states:
        soft = hand.startswith("A")
        total = 11 + int(hand[1:]) if soft else int(hand)
        assert (info["player_total"], info["usable_ace"], info["dealer_card"]) == (total, soft, rank)
        assert len(info["player_cards"]) == 2 and obs.shape == (224, 224, 3)
    assert expert[("12", "2")] == expert[("12", "7")] == expert[("16", "K")] == expert[("5", "6")] == "hit"
    assert expert[("13", "6")] == expert[("17", "A")] == expert[("20", "10")] == "stand"
    assert expert[("A6", "9")] == "hit" and expert[("A7", "2")] == "stand"


def test_reading_policy_table_win_rate_is_exact():
    """dev/reading.py --policy's win rate of a table: the expert's choices give the expert's exact 42.95%
    (a hand of three cards chooses as its total's two-card row), standing everywhere the stand-only rate,
    and a half-and-half table lies between; a sampled table is the mix, not its majority."""
    rd = runpy.run_path(PROBES)
    b = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "baselines.py"))
    keys = [(h, r, a) for h, r, _, _, a in rd["blackjack_states"]()]
    expert = rd["table_win_rate"]({(h, r): float(a == "hit") for h, r, a in keys})
    assert abs(expert - b["exact_win_rate"](envs.blackjack_expert_hits)) < 1e-12 and 0.429 < expert < 0.4316
    stand = rd["table_win_rate"]({(h, r): 0.0 for h, r, _ in keys})
    assert abs(stand - b["exact_win_rate"](lambda hard, ace, up: False)) < 1e-12
    half = rd["table_win_rate"]({(h, r): 0.5 for h, r, _ in keys})
    assert stand < expert and half < expert and half != stand
    mixed = rd["table_win_rate"]({(h, r): 0.75 if a == "hit" else 0.25 for h, r, a in keys})
    assert half < mixed < expert


def test_reading_three_card_hands_and_their_win_chances():
    """dev/reading.py --three-cards: hands of three cards under 21, the same ones each time; the exact
    chances to win by standing and by hitting (tools/baselines.py): choosing as the expert at every deal
    gives its 42.95%."""
    rd = runpy.run_path(PROBES)
    b = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "baselines.py"))
    hands = rd["three_card_states"](12)
    assert len(hands) == 12 and all(obs.shape == (224, 224, 3) for obs, _ in hands)
    assert all(len(i["player_cards"]) == 3 and i["player_total"] < 21 for _, i in hands)
    assert [i for _, i in hands] == [i for _, i in rd["three_card_states"](12)]
    chances = b["policy_chances"](envs.blackjack_expert_hits)[0]

    def expert(hard, ace, up):
        stand, hit = chances(hard, ace, up)
        return hit if envs.blackjack_expert_hits(hard, ace, up) else stand
    dealt = sum(pu * pa * pb * expert(a + b, 1 in (a, b), up)
                for up, pu in envs.DRAW for a, pa in envs.DRAW for b, pb in envs.DRAW)
    assert abs(dealt - b["exact_win_rate"](envs.blackjack_expert_hits)) < 1e-12
    assert chances(20, False, 10)[0] > chances(20, False, 10)[1]  # stand on 20
    assert chances(11, False, 6)[1] > chances(11, False, 6)[0]  # hit 11


def test_reading_every_deal_and_its_exact_win_rate():
    """dev/reading.py --all-deals: every two-card deal against every up-card, each once; the exact win rate
    of choices known deal by deal is the expert's 42.95% for the expert's choices, and for any policy of
    the hand's total alone it is tools/baselines.py's rate of that policy. The expert maximizes the return,
    not the chance to win, so it gives a little of that away (most in hard 12-16); choices that differ
    between the cards making one total count as such (hitting soft 20 only with the ace second)."""
    rd = runpy.run_path(PROBES)
    b = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "baselines.py"))
    deals = rd["every_deal"]()
    infos = [info for _, info in deals]
    assert len(deals) == 13 ** 3 and deals[0][0].shape == (224, 224, 3)
    assert len({(*i["player_cards"], i["dealer_card"]) for i in infos}) == 13 ** 3
    assert [i["player_cards"] for i in infos] == [i["player_cards"] for _, i in rd["every_deal"]()]

    def by_total(policy):
        return [float(policy(sum(envs.VALUE[r] for r in i["player_cards"]), "A" in i["player_cards"],
                             envs.VALUE[i["dealer_card"]])) for i in infos]
    rate, lost = rd["deals_win_rate"](infos, by_total(envs.blackjack_expert_hits))
    assert abs(rate - b["exact_win_rate"](envs.blackjack_expert_hits)) < 1e-12 and 0.429 < rate < 0.4316
    assert 0 <= min(lost.values()) and max(lost.values()) == lost["hard 12-16"] < 0.002

    def below17(hard, ace, up):
        return envs._best(hard, ace) < 17
    assert abs(rd["deals_win_rate"](infos, by_total(below17))[0] - b["exact_win_rate"](below17)) < 1e-12
    expert = by_total(envs.blackjack_expert_hits)
    second = [1.0 if i["player_cards"] == ["9", "A"] else h for i, h in zip(infos, expert)]  # soft 20, the ace second
    rate2, lost2 = rd["deals_win_rate"](infos, second)
    assert rate2 < rate - 0.0005 and lost2["soft"] > lost["soft"] + 0.0005 and lost2["hard 12-16"] == lost["hard 12-16"]


def test_reading_hits_of_an_answer():
    """dev/reading.py's share of an answer that hits: 1 for "hit", 0 for "stand", 0.5 (a coin flip, as a run
    plays it) for an answer naming no single legal action."""
    rd = runpy.run_path(PROBES)
    names = envs.TASKS["blackjack"].action_names
    assert rd["hits_of"]('{"thoughts": "I have 12.", "action": "hit"}', names) == 1.0
    assert rd["hits_of"]('{"thoughts": "I have 20.", "action": "stand"}', names) == 0.0
    assert rd["hits_of"]('{"thoughts": "I have 20.", "action": "double"}', names) == 0.5
    assert rd["hits_of"]("no json at all", names) == 0.5


def test_reading_play_then_policy_asks_every_probe_state(tmp_path):
    """dev/reading.py --play --policy on NumberLine: --policy asks every probe state 8 times, whatever --play
    played before it (its episodes run in pools of their own, a --batch at a time)."""
    out = tmp_path / "run"
    r = _run(*_tiny_cli(out, "--num-updates", "0", "--eval-episodes", "0"))
    assert r.returncode == 0, r.stderr[-2000:]
    p = subprocess.run([sys.executable, PROBES, str(out), "--states", "3", "--batch", "2", "--play", "--policy"],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "played to the end" in p.stdout and "24 answers (8 per state)" in p.stdout
