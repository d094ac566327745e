"""The four "gym_cards" tasks of RL4VLM as image-observation gymnasium environments.

Paper: "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via Reinforcement
Learning", Zhai et al. 2024, https://arxiv.org/abs/2405.10292. The agent sees only an RGB image
(np.uint8, image_size x image_size x 3) and picks a named action (`env.action_names[id]`):

    NumberLine  move "current" onto "target" with "-" / "+"
    EZPoints    write a formula with the two cards that equals 12 ("1".."10", "+", "*", "=")
    Points24    write a formula with the four cards that equals 24 (+ - * / ( ) as well)
    Blackjack   "stand" or "hit" against a dealer whose second card is face down

Rules follow the official environments (github.com/RL4VLM/RL4VLM, gym-cards/gym_cards/envs), with
a few deliberate departures listed, each with its reason, in docs/departures.md: all randomness
goes through the env's own `self.np_random` (so `reset(seed=s)` reproduces a deal and its images),
formulas are evaluated exactly by a small parser (`evaluate`, never `eval`), a number no unused card
shows writes a visible blank "_", a formula that grows too long is a lost game (terminated), and
cards and text are drawn with Pillow's built-in font at 224 px, nothing read from disk.
Each env also has `expert_action()`, the best action from the true state (exact solver for
the formula games, a dynamic-programming policy for Blackjack), used for demonstrations.

Play a game in a Python shell:
    >>> import envs; env = envs.make("points24"); obs, info = env.reset(seed=0); info["cards"]
    >>> obs, reward, terminated, truncated, info = env.step(env.action_names.index("8"))
    >>> env.step(env.expert_action())   # let the expert continue
"""
import functools
import math
from fractions import Fraction

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw, ImageFont

RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
VALUE = {r: min(i + 1, 10) for i, r in enumerate(RANKS)}  # A=1, J/Q/K=10
SUITS = "SHDC"  # spades, hearts, diamonds, clubs
FELT, INK, RED = (25, 110, 60), (15, 15, 15), (200, 0, 20)


# ---------------------------------------------------------------- drawing (all sprites cached)
@functools.lru_cache(maxsize=None)
def _font(size):
    return ImageFont.load_default(size=size)


def _text(draw, xy, text, size, fill=INK, anchor="mm", max_width=None):
    """Bold text (a stroke in the same colour) at `size` px, shrunk to fit `max_width`."""
    size = int(size)
    if max_width is not None:
        width = draw.textlength(text, font=_font(size)) or 1
        size = int(min(size, size * max_width / (width * 1.08)))
    size = max(size, 6)
    draw.text(xy, text, font=_font(size), fill=fill, anchor=anchor,
              stroke_width=round(size / 28), stroke_fill=fill)  # none below ~15 px: it blurs


def _suit(draw, suit, x, y, s, fill):
    """A suit symbol as plain shapes in the square (x, y, s)."""
    def circle(cx, cy, r):
        draw.ellipse((x + (cx - r) * s, y + (cy - r) * s, x + (cx + r) * s, y + (cy + r) * s), fill=fill)
    def poly(*pts):
        draw.polygon([(x + px * s, y + py * s) for px, py in pts], fill=fill)
    if suit == "D":
        poly((0.5, 0), (0.9, 0.5), (0.5, 1), (0.1, 0.5))
    elif suit == "H":
        circle(0.28, 0.32, 0.25), circle(0.72, 0.32, 0.25), poly((0.04, 0.4), (0.96, 0.4), (0.5, 1))
    elif suit == "S":
        circle(0.28, 0.6, 0.22), circle(0.72, 0.6, 0.22), poly((0.07, 0.55), (0.93, 0.55), (0.5, 0))
        poly((0.5, 0.6), (0.3, 1), (0.7, 1))
    else:  # clubs
        circle(0.5, 0.26, 0.22), circle(0.26, 0.6, 0.22), circle(0.74, 0.6, 0.22)
        poly((0.5, 0.5), (0.3, 1), (0.7, 1))


@functools.lru_cache(maxsize=None)
def _card(rank, suit, w, h, bg=FELT):
    """A face-up card (rank=None: a card back), drawn 4x larger and downsampled for smooth edges."""
    k = 4
    img = Image.new("RGB", (w * k, h * k), bg)
    d = ImageDraw.Draw(img)
    box, radius, border = (0, 0, w * k - 1, h * k - 1), min(w, h) * k // 8, max(k, min(w, h) * k // 28)
    if rank is None:  # a plain blue back with a frame: clearly not a face
        d.rounded_rectangle(box, radius, fill=(30, 60, 170), outline=(240, 240, 240), width=2 * border)
        inset = min(w, h) * k // 6
        d.rounded_rectangle((inset, inset, w * k - inset, h * k - inset), radius // 2, outline=(130, 160, 235), width=border)
    else:
        color = RED if suit in "HD" else INK
        d.rounded_rectangle(box, radius, fill="white", outline=(60, 60, 60), width=border)
        s = min(0.2 * h, 0.2 * w) * k  # small suit symbols in two corners; the rank dominates
        _suit(d, suit, 0.05 * w * k, 0.05 * h * k, s, color)
        _suit(d, suit, w * k - 0.05 * w * k - s, h * k - 0.05 * h * k - s, s, color)
        # "10" is ~1.2 x size wide, digits ~0.72 x size tall; on a wide card the suits sit beside the
        # rank (leave them 38% of the width), on a tall one above and below it
        size = min((0.62 if w > h else 0.86) * w / 1.2, 0.6 * h / 0.72) * k
        _text(d, (w * k / 2, h * k / 2), rank, size, color)
    return img.resize((w, h), Image.Resampling.LANCZOS)


def _draw_cards(img, cards, box, cols, aspect, grid=None):
    """Paste cards [(rank, suit) or None for a back] centred in box, `cols` per row. With `grid` (px),
    neighbouring cards sit a whole number of grid cells apart, so every card is cut into a ViT's
    patches the same way when the patches tile the grid."""
    x0, y0, x1, y1 = box
    rows, cols = math.ceil(len(cards) / cols), min(cols, len(cards))
    gap = max(2, (x1 - x0) // 40)
    h = ((y1 - y0) - gap * (rows - 1)) // rows
    w = min(int(h * aspect), ((x1 - x0) - gap * (cols - 1)) // cols)
    step_x, step_y = w + gap, h + gap  # from one card's corner to the next one's
    if grid:  # round each step to whole cells, fewer where more would not fit; shrink the card to keep a gap
        step_x = max(1, min(round(step_x / grid), ((x1 - x0) - w) // max(cols - 1, 1) // grid)) * grid
        step_y = max(1, min(round(step_y / grid), ((y1 - y0) - h) // max(rows - 1, 1) // grid)) * grid
        w, h = min(w, step_x - gap), min(h, step_y - gap)
    for i, card in enumerate(cards):
        r, c = divmod(i, cols)
        in_row = min(cols, len(cards) - r * cols)
        left = x0 + ((x1 - x0) - (in_row - 1) * step_x - w) // 2
        sprite = _card(None, None, w, h) if card is None else _card(card[0], card[1], w, h)
        img.paste(sprite, (left + c * step_x, y0 + r * step_y))


# ---------------------------------------------------------------- exact formulas
BLANK = "_"  # written for a number that no unused card shows


class _Malformed(Exception):
    pass


def evaluate(tokens):
    """Exact value (Fraction) of a token list such as ["8", "/", "(", "3", "-", "8", "/", "3", ")"],
    or None if it is malformed or divides by zero. Blanks "_" are skipped, but never join two numbers
    ("2 _ * 6" is 12, "2 _ 10" is malformed). Grammar: expr = term {(+|-) term};
    term = factor {(*|/) factor}; factor = number | "(" expr ")"."""
    tokens, pos = [t for t in tokens if t != BLANK], 0

    def take(expected=None):
        nonlocal pos
        if pos >= len(tokens) or (expected is not None and tokens[pos] != expected):
            raise _Malformed
        pos += 1
        return tokens[pos - 1]

    def factor():
        tok = take()
        if tok == "(":
            value = expr()
            take(")")
            return value
        if not tok.isdecimal():
            raise _Malformed
        return Fraction(int(tok))

    def term():
        value = factor()
        while pos < len(tokens) and tokens[pos] in ("*", "/"):
            op, rhs = take(), factor()
            if op == "/" and rhs == 0:
                raise _Malformed
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr():
        value = term()
        while pos < len(tokens) and tokens[pos] in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    try:
        value = expr()
        return value if pos == len(tokens) else None  # leftovers, e.g. "3 8": no concatenation
    except _Malformed:
        return None


PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(op, ta, pa, tb, pb):
    """Tokens and precedence of (a op b), with parentheses only where precedence needs them."""
    p = PREC[op]
    left = ("(",) + ta + (")",) if pa < p else ta
    right = ("(",) + tb + (")",) if pb < p or (pb == p and op in "-/") else tb
    return left + (op,) + right, p


def _splits(mask):
    """Every non-empty proper submask of `mask` (both sides of each split appear, so a-b and b-a)."""
    sub = (mask - 1) & mask
    while sub:
        yield sub
        sub = (sub - 1) & mask


@functools.lru_cache(maxsize=None)
def solve(numbers, target, ops="+-*/"):
    """All token tuples that use each of `numbers` (a sorted tuple, 2 or more) exactly once and
    equal `target` (non-zero), shortest first. Exhaustive over subsets as bitmasks: an expression
    over a subset is (expression over a part) op (expression over the rest)."""
    target, full = Fraction(target), (1 << len(numbers)) - 1
    exprs = {}  # mask -> {tokens: (value, precedence)}
    for mask in range(1, full):  # submasks are smaller numbers, so they are ready
        if mask & (mask - 1) == 0:
            x = numbers[mask.bit_length() - 1]
            exprs[mask] = {(str(x),): (Fraction(x), 3)}
            continue
        out = exprs[mask] = {}
        for sub in _splits(mask):
            for ta, (a, pa) in exprs[sub].items():
                for tb, (b, pb) in exprs[mask ^ sub].items():
                    for op in ops:
                        if op != "/" or b:
                            v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
                            tokens, p = _combine(op, ta, pa, tb, pb)
                            out[tokens] = (v, p)
    by_value = {}  # the top level needs a op b == target: look up the b that each a needs
    for mask, group in exprs.items():
        for tokens, (v, p) in group.items():
            by_value.setdefault((mask, v), []).append((tokens, p))
    solutions = set()
    for sub in _splits(full):
        rest = full ^ sub
        if (len(exprs[sub]), sub) > (len(exprs[rest]), rest):
            continue  # walk the smaller side of each split once, as left and as right operand
        for tk, (k, pk) in exprs[sub].items():
            for op in ops:  # solve k op x == target (x on the right) and x op k == target (x on the left)
                if op == "+":
                    x_right = x_left = target - k
                elif op == "-":
                    x_right, x_left = k - target, target + k
                elif not k:
                    continue  # 0 * x and 0 / x are never the (non-zero) target; x / 0 is undefined
                elif op == "*":
                    x_right = x_left = target / k
                else:
                    x_right, x_left = k / target, target * k
                for tx, px in by_value.get((rest, x_right), ()):
                    solutions.add(_combine(op, tk, pk, tx, px)[0])
                for tx, px in by_value.get((rest, x_left), ()):
                    solutions.add(_combine(op, tx, px, tk, pk)[0])
    return tuple(sorted(solutions, key=lambda t: (len(t), t)))


def solves(units, numbers, target):
    """Does the formula (a token list; blanks skipped) use each of `numbers` exactly once and equal
    `target`? What "=" rewards."""
    used = sorted(int(u) for u in units if u.isdigit())
    return used == sorted(numbers) and evaluate(units) == target


def continue_solution(numbers, units, target, ops):
    """The first (shortest) solution that starts with `units`, the formula written so far (blanks
    "_" are dropped from it), or None. `ops` may include brackets; only the arithmetic operators
    matter to the solver."""
    units = [u for u in units if u != BLANK]
    for sol in solve(tuple(sorted(numbers)), target, "".join(o for o in ops if o in PREC)):
        if list(sol[:len(units)]) == list(units):
            return sol
    return None


# ---------------------------------------------------------------- Blackjack helpers
DRAW = [(v, (4 if v == 10 else 1) / 13) for v in range(1, 11)]  # infinite deck: value, probability


def hand_value(ranks):
    """(best total, usable ace): an ace counts 11 when that does not bust."""
    hard = sum(VALUE[r] for r in ranks)
    return _best(hard, "A" in ranks), _best(hard, "A" in ranks) != hard


def _best(hard, ace):
    return hard + 10 if ace and hard + 10 <= 21 else hard


@functools.lru_cache(maxsize=None)
def _dealer_final(hard, ace):
    """Distribution {final total (0 = bust): probability} of a dealer who draws to 17."""
    t = _best(hard, ace)
    if t >= 17:
        return {t if t <= 21 else 0: 1.0}
    out = {}
    for v, p in DRAW:
        for f, q in _dealer_final(hard + v, ace or v == 1).items():
            out[f] = out.get(f, 0.0) + p * q
    return out


@functools.lru_cache(maxsize=None)
def blackjack_values(hard, ace, up):
    """(expected return of standing, of hitting then playing on optimally), dealer up-card value `up`
    (the hidden card is still unknown, so the dealer starts from the up-card alone)."""
    t = _best(hard, ace)
    stand = sum(p * ((t > f) - (t < f)) for f, p in _dealer_final(up, up == 1).items())
    hit = sum(p * (-1.0 if hard + v > 21 else max(blackjack_values(hard + v, ace or v == 1, up)))
              for v, p in DRAW)
    return stand, hit


def blackjack_expert_hits(hard, ace, up):
    """The expert's choice: hit when hitting has the higher expected return (exact DP, infinite deck)."""
    stand, hit = blackjack_values(hard, ace, up)
    return hit > stand


# ---------------------------------------------------------------- environments
class Task(gym.Env):
    """A task: image observations, named actions, and what it tells the agent, from which rl4vlm.py builds
    its prompts and its SFT demonstrations (paper Fig. 3):
      action_names          the legal actions, listed in the prompt
      instructions          the task in words, the prompt's first line
      prompt_state(info)    a line of state the prompt gives as text ("" for none: the formula so far)
      state_fields(info)    the answer's first JSON fields, what the image shows: SFT teaches reading them
      thoughts(info)        a demonstration's thoughts: what the state means (its chain of thought)
      expert_action()       the demonstrations' action in the current state
    with reset() and step() returning an info dict that holds the state. A new task is a subclass and a
    register() call: docs/your_task.md."""
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    action_names = []
    instructions = ""

    @staticmethod
    def prompt_state(info):
        return ""

    def __init__(self, image_size=224, render_mode=None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.image_size, self.render_mode = int(image_size), render_mode
        self._spaces()

    def _spaces(self):
        self.observation_space = gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(self.action_names))

    def __getstate__(self):  # pickled (a run's checkpoint) without its spaces, 4 times its image's size
        return {k: v for k, v in vars(self).items() if k not in ("observation_space", "action_space")}

    def __setstate__(self, state):
        vars(self).update(state)
        self._spaces()

    def _check(self, action):
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if not isinstance(action, (int, np.integer)) or isinstance(action, bool) \
                or not 0 <= action < len(self.action_names):
            raise ValueError(f"invalid action {action!r}: expected an integer id in "
                             f"0..{len(self.action_names) - 1} ({', '.join(self.action_names)})")
        return self.action_names[int(action)]

    def _options(self, options, keys):
        if not options:
            return None
        if set(options) != set(keys):
            raise ValueError(f"options must have exactly the keys {keys}, got {sorted(options)}")
        return options

    def render(self):
        return self._obs.copy()


def _ranks(cards, n=None):
    if not isinstance(cards, (list, tuple)) or (n is not None and len(cards) != n) \
            or not all(isinstance(r, str) and r in RANKS for r in cards):
        raise ValueError(f"expected {n or 'a list of'} card ranks from {RANKS}, got {cards!r}")
    return list(cards)


class NumberLineEnv(Task):
    """Move "Current" onto "Target" on the positions 0..max_position.

    Example state: {"target": 3, "current": 1}; the image reads "Target: 3" / "Current: 1".
    "+" gives reward 0 (closer), then "+" gives +1 and ends the episode. A move that does not get
    closer (wrong way, or bumping into 0 / max_position) costs -1. Truncated after 2*max_position steps.
    Start (the official rule): current and target each uniform over 0..max_position; if they are
    equal, target = (target + 1) % max_position. So they always differ, and the max_position + 1
    pairs (c, (c + 1) % max_position) are twice as likely as the others.
    """
    action_names = ["-", "+"]
    instructions = ("You are playing Number Line. The image shows a target number and a current number. "
                    "Move the current number to the target: \"+\" adds one, \"-\" subtracts one.")

    @staticmethod
    def state_fields(info):
        return {"current number": info["current"], "target number": info["target"]}

    @staticmethod
    def thoughts(info):
        """How the numbers relate, never what to do: the deciding is left to RL (the paper's CoT ablation)."""
        side = "larger" if info["target"] > info["current"] else "smaller"
        return f"The current number is {info['current']} and the target {info['target']} is {side}."

    def __init__(self, image_size=224, render_mode=None, max_position=5):
        super().__init__(image_size, render_mode)
        self.max_position = int(max_position)
        if self.max_position < 2:  # the start rule needs it: with 1, (0 + 1) % 1 would start on the target
            raise ValueError(f"max_position must be at least 2, got {max_position!r}")

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if self._options(options, ["current", "target"]):
            self.target, self.current = options["target"], options["current"]
            if not all(isinstance(x, int) and 0 <= x <= self.max_position for x in (self.target, self.current)) \
                    or self.target == self.current:
                raise ValueError(f"target and current must be different ints in 0..{self.max_position}")
        else:
            self.current, self.target = (int(x) for x in self.np_random.integers(self.max_position + 1, size=2))
            if self.target == self.current:
                self.target = (self.target + 1) % self.max_position
        self.steps = 0
        self._obs = self._image()
        return self._obs.copy(), self._info()

    def step(self, action):
        name = self._check(action)
        before = abs(self.current - self.target)
        self.current = min(max(self.current + (1 if name == "+" else -1), 0), self.max_position)
        self.steps += 1
        terminated = self.current == self.target
        reward = 1.0 if terminated else 0.0 if abs(self.current - self.target) < before else -1.0
        truncated = not terminated and self.steps >= 2 * self.max_position
        self._obs = self._image()
        return self._obs.copy(), reward, terminated, truncated, self._info()

    def _info(self):
        return {"target": self.target, "current": self.current}

    def expert_action(self):
        return self.action_names.index("+" if self.target > self.current else "-")

    def _image(self):
        return _numberline_image(self.target, self.current, self.image_size)


@functools.lru_cache(maxsize=4096)
def _numberline_image(target, current, S):
    img = Image.new("RGB", (S, S), "white")
    d = ImageDraw.Draw(img)
    for i, (label, value) in enumerate((("Target:", target), ("Current:", current))):
        cy = S * (0.27 + 0.46 * i)
        _text(d, (0.04 * S, cy), label, 0.16 * S, anchor="lm", max_width=0.6 * S)
        _text(d, (0.83 * S, cy), str(value), 0.36 * S, fill=(0, 40, 160))
    return np.array(img)


class _FormulaGame(Task):
    """Write a formula, one unit (number, operator or parenthesis) per step, then "=".

    The official rules, checked in this order at each step:
      * the formula already holds more than `max_units` units: the episode ends with -1 and the
        action is not applied (terminated: a lost game; officially flagged truncated);
      * "=": 10 if the formula uses every card's number exactly once and equals the target, else
        -1; the episode ends;
      * a number that no unused card shows: -1, and a blank "_" is written instead. It counts toward
        the length and uses no card; "=" skips it, so the formula can still be completed;
      * anything else is written, reward 0.
    """
    n_cards = target = max_units = ops = None  # set by the subclasses
    card_bottom, card_cols, card_aspect = 0.75, 2, 0.72  # cards above card_bottom * S, formula below
    card_grid = None  # cards a whole number of S / card_grid apart (see _draw_cards)

    def __init__(self, image_size=224, render_mode=None):
        self.action_names = [str(i) for i in range(1, 11)] + list(self.ops) + ["="]
        super().__init__(image_size, render_mode)

    @staticmethod
    def prompt_state(info):  # as the official prompt: the formula so far names the cards already played
        return f"The formula so far is '{info['formula']}'."

    @staticmethod
    def state_fields(info):
        return {"cards": info["numbers"], "formula": info["formula"]}

    @classmethod
    def thoughts(cls, info):
        """The expert's whole plan, with a bar where the formula so far ends: the action is the unit after
        the bar, a copy, rather than the unit at a count of the formula's units."""
        so_far = [u for u in info["formula"].split() if u != BLANK]
        plan = continue_solution(info["numbers"], so_far, cls.target, cls.ops)
        cards = ", ".join(map(str, info["numbers"]))
        if plan is None:
            return f"The cards are {cards}; no formula from here makes {cls.target}."
        written = " ".join([*plan[:len(so_far)], "|", *plan[len(so_far):]])
        return f"The cards are {cards}; {written} makes {cls.target}."

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        ranks = _ranks(options["cards"], self.n_cards) if self._options(options, ["cards"]) else self._deal()
        self.cards = [(r, SUITS[self.np_random.integers(4)]) for r in ranks]
        self.numbers = [VALUE[r] for r in ranks]
        self.units = []
        S = self.image_size  # the cards never change during an episode: draw them once
        self._table = Image.new("RGB", (S, S), FELT)
        _draw_cards(self._table, self.cards, (S // 40, S // 40, S - S // 40, int(self.card_bottom * S)),
                    self.card_cols, self.card_aspect, self.card_grid and S // self.card_grid)
        self._obs = self._image()
        return self._obs.copy(), self._info()

    def step(self, action):
        name = self._check(action)
        reward, terminated = 0.0, False
        if len(self.units) > self.max_units:  # too long: lost, whatever the action
            reward, terminated = -1.0, True
        elif name == "=":
            reward, terminated = (10.0 if solves(self.units, self.numbers, self.target) else -1.0), True
        else:
            if name.isdigit() and self.units.count(name) >= self.numbers.count(int(name)):
                name, reward = BLANK, -1.0  # not on an unused card
            self.units.append(name)
        self._obs = self._image()
        return self._obs.copy(), reward, terminated, False, self._info()

    def _info(self):
        return {"cards": [r for r, _ in self.cards], "numbers": list(self.numbers), "formula": " ".join(self.units)}

    def expert_action(self):
        """Continue the first (shortest) solution that the formula so far (blanks dropped) is a prefix
        of; else give up."""
        k = sum(u != BLANK for u in self.units)
        sol = continue_solution(self.numbers, self.units, self.target, self.ops)
        return self.action_names.index(sol[k] if sol and len(sol) > k else "=")

    def _image(self):
        S, img = self.image_size, self._table.copy()
        top = int(self.card_bottom * S) + S // 40
        img.paste(_formula_band(tuple(self.units), S - 2 * (S // 40), S - S // 40 - top), (S // 40, top))
        return np.array(img)


@functools.lru_cache(maxsize=4096)
def _formula_band(units, w, h):
    """The formula on a white band, compact ("8/(3-8/3)"): a space only between two numbers/blanks."""
    img = Image.new("RGB", (w, h), FELT)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, w - 1, h - 1), max(2, h // 6), fill="white")
    text = "".join((" " if i and (u[0] in "0123456789_") and (units[i - 1][0] in "0123456789_") else "") + u
                   for i, u in enumerate(units))
    _text(d, (w / 2, h / 2), text, 0.7 * h, max_width=0.94 * w)
    return img


class EZPointsEnv(_FormulaGame):
    """Make 12 from two cards with "+" and "*".

    Example state: cards ["2", "K"] (numbers [2, 10]): "2", "+", "10", "=" earns 10.
    Deal (the official one): the first card's rank is uniform over 2..K (value v, J/Q/K count 10);
    the second card's value is 12 // v with probability 1/2 if v is 2, 3, 4 or 6 (12 by *), else
    12 - v (12 by +), and its rank is that number (a 10 shows as 10, never J/Q/K); then the two
    cards swap places with probability 1/2. So every deal is solvable.
    """
    n_cards, target, max_units, ops = 2, 12, 5, ("+", "*")
    instructions = ("You are playing EZ Points. The image shows two playing cards; J, Q and K count as 10 "
                    "and A as 1. Write a formula that uses the number of each card exactly once and equals 12. "
                    "Each action appends a number or an operator to the formula; \"=\" submits it.")

    def _deal(self):
        first = RANKS[1 + self.np_random.integers(12)]
        v = VALUE[first]
        second = 12 // v if v in (2, 3, 4, 6) and self.np_random.random() < 0.5 else 12 - v
        pair = [first, str(second)]
        return pair[::-1] if self.np_random.random() < 0.5 else pair


class Points24Env(_FormulaGame):
    """Make 24 from four cards with + - * / and parentheses (J, Q, K count 10; A counts 1).

    Example state: cards ["8", "3", "8", "3"]: "8 / ( 3 - 8 / 3 )" then "=" earns 10.
    Deal (the official one, with its default treat_face_cards_as_10=True): four ranks uniform over
    A..K; about 73.1% of deals are solvable.
    """
    n_cards, target, max_units, ops = 4, 24, 20, ("+", "-", "*", "/", "(", ")")
    instructions = ("You are playing Points 24. The image shows four playing cards; J, Q and K count as 10 "
                    "and A as 1. Write a formula that uses the number of each card exactly once and equals 24. "
                    "Each action appends a number, an operator or a bracket to the formula; \"=\" submits it.")
    card_aspect = 1.3  # a 2x2 grid of wide cards keeps the ranks big
    # the cards sit whole eighths of the image apart: a ViT whose patches tile the eighths (the tiny
    # model's 8x8 at 112 px, LLaVA's 24x24 at 336) cuts every card's rank into patches the same way,
    # so a rank learned in one place is read in every place (docs/LOG.md)
    card_grid = 8

    def _deal(self):
        return [RANKS[i] for i in self.np_random.integers(13, size=4)]


class BlackjackEnv(Task):
    """Gymnasium's Blackjack rules on an infinite deck: "hit" draws a card (over 21 loses, -1);
    "stand" lets the dealer draw to 17 (stands on soft 17); +1 win, 0 draw, -1 loss, no natural
    bonus. The dealer's second card is face down until the episode ends. These are the official
    rules (natural=False, sab=False); one difference: each card's rank is uniform over A..K, so a
    10-valued card shows as 10, J, Q or K (officially J, Q or K only); the values' distribution,
    and so every reward, is the same.

    Example state: {"player_cards": ["A", "7"], "player_total": 18, "usable_ace": True, "dealer_card": "10"}.
    """
    action_names = ["stand", "hit"]
    instructions = ("You are playing Blackjack. The image shows the dealer's cards on top (the second one is "
                    "face down) and your cards below; J, Q and K count as 10, A as 1 or 11. Beat the dealer's "
                    "total without going over 21: \"hit\" takes another card, \"stand\" ends your turn.")

    @staticmethod
    def state_fields(info):
        return {"dealer card": info["dealer_card"], "my cards": info["player_cards"], "my total": info["player_total"]}

    @staticmethod
    def thoughts(info):
        """The hand against the next card, never what to do: the deciding is left to RL."""
        soft = " with a usable ace" if info["usable_ace"] else ""
        t, card = info["player_total"], info["dealer_card"]
        value = {"J": 10, "Q": 10, "K": 10, "A": "1 or 11"}.get(card, card)
        safe = 21 - t
        bust = ("no card busts me" if info["usable_ace"] or safe >= 10 else
                "every card busts me" if safe < 1 else f"a card above {safe} busts me")
        return f"I have {t}{soft} and the dealer shows {card}, worth {value}; {bust}."

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if self._options(options, ["dealer", "player"]):
            player, dealer = _ranks(options["player"]), _ranks(options["dealer"], 2)
            if len(player) < 2 or hand_value(player)[0] > 21:
                raise ValueError(f"the player needs at least 2 cards and at most 21 points, got {player}")
            self.player = [(r, SUITS[self.np_random.integers(4)]) for r in player]
            self.dealer = [(r, SUITS[self.np_random.integers(4)]) for r in dealer]
        else:
            self.dealer = [self._draw(), self._draw()]
            self.player = [self._draw(), self._draw()]
        self.done = False
        self._obs = self._image()
        return self._obs.copy(), self._info()

    def _draw(self):
        return RANKS[self.np_random.integers(13)], SUITS[self.np_random.integers(4)]

    def step(self, action):
        name, reward = self._check(action), 0.0
        if name == "hit":
            self.player.append(self._draw())
            if hand_value([r for r, _ in self.player])[0] > 21:
                reward, self.done = -1.0, True
        else:
            while hand_value([r for r, _ in self.dealer])[0] < 17:
                self.dealer.append(self._draw())
            p, d = (hand_value([r for r, _ in hand])[0] for hand in (self.player, self.dealer))
            d = 0 if d > 21 else d
            reward, self.done = float((p > d) - (p < d)), True
        self._obs = self._image()
        return self._obs.copy(), reward, self.done, False, self._info()

    def _info(self):
        total, ace = hand_value([r for r, _ in self.player])
        info = {"player_cards": [r for r, _ in self.player], "player_total": total,
                "usable_ace": ace, "dealer_card": self.dealer[0][0]}
        if self.done:
            info["dealer_cards"] = [r for r, _ in self.dealer]
            info["dealer_total"] = hand_value(info["dealer_cards"])[0]
        return info

    def expert_action(self):
        ranks = [r for r, _ in self.player]
        hits = blackjack_expert_hits(sum(VALUE[r] for r in ranks), "A" in ranks, VALUE[self.dealer[0][0]])
        return self.action_names.index("hit" if hits else "stand")

    def _image(self):
        S = self.image_size
        img = Image.new("RGB", (S, S), FELT)
        g = S // 40
        dealer = self.dealer if self.done else [self.dealer[0], None]  # None: the face-down card
        _draw_cards(img, dealer, (g, g, S - g, int(0.45 * S)), 6, 0.72)
        ImageDraw.Draw(img).line((g, int(0.485 * S), S - g, int(0.485 * S)), fill=(200, 230, 200), width=max(1, S // 112))
        n = len(self.player)
        _draw_cards(img, self.player, (g, int(0.52 * S), S - g, S - g), n if n <= 5 else math.ceil(n / 2), 0.72)
        return np.array(img)


# ---------------------------------------------------------------- registration
TASKS = {}  # task name -> env class: what make() and rl4vlm.py's --task choose from


def env_id(task):
    """The gymnasium id of a task: "numberline" -> "rl4vlm/NumberLine-v0"."""
    return f"rl4vlm/{TASKS[task].__name__.removesuffix('Env')}-v0"


def register(task, env_class):
    """Make a task known to make(), to rl4vlm.py's --task and to gymnasium (env_id)."""
    TASKS[task] = env_class
    if env_id(task) not in gym.registry:  # importing twice must not register twice
        gym.register(id=env_id(task), entry_point=env_class)


for _task, _cls in [("numberline", NumberLineEnv), ("ezpoints", EZPointsEnv), ("points24", Points24Env),
                    ("blackjack", BlackjackEnv)]:
    register(_task, _cls)


def make(task, **kwargs):
    """make("points24", image_size=112) -> the unwrapped env for a short task name."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return gym.make(env_id(task), **kwargs).unwrapped


# ---------------------------------------------------------------- many environments, seeded episodes
# Each use of episodes has its own range of env seeds: no training episode is ever an evaluation one.
SEED_USES = ("evaluation", "probe", "tokenizer", "sft", "rollout")


def episode_seed(use, i, run_seed=0):
    """The env seed of episode (or env) i of a use, ((run_seed * 5 + use) << 32) + i: no two (use, run_seed,
    i) share one. Evaluation and the reading probe keep run_seed 0: every run plays the same episodes."""
    if not (0 <= i < 2**32 and run_seed >= 0):
        raise ValueError(f"episode_seed needs 0 <= i < 2**32 and run_seed >= 0, got {i}, {run_seed}")
    return ((run_seed * len(SEED_USES) + SEED_USES.index(use)) << 32) + i


class EnvPool:
    """Environments stepped together, env i first reset with seeds[i]. A finished episode starts over in
    place, with its env's own RNG or the next seed of `queue` (an env whose queue is empty leaves `active`)."""

    def __init__(self, task, seeds, queue=None):
        self.task, self.queue = task, queue
        self.envs = [make(task) for _ in seeds]
        self.action_names = make(task).action_names if not seeds else self.envs[0].action_names
        first = [env.reset(seed=seed) for seed, env in zip(seeds, self.envs)]  # [(obs, info), ...]
        self.obs, self.infos = [o for o, _ in first], [i for _, i in first]
        self.returns = [0.0] * len(seeds)
        self.active = list(range(len(seeds)))  # the envs still playing, in order

    def observations(self):
        return [self.obs[i] for i in self.active]

    def restart(self, i):
        """Start env i's episode over: after its end, or early (SFT's extra start states)."""
        seed = None if self.queue is None else next(self.queue, None)
        if self.queue is not None and seed is None:  # no episode left for env i
            self.active.remove(i)
            return
        self.obs[i], self.infos[i] = self.envs[i].reset(seed=seed)
        self.returns[i] = 0.0

    def step(self, actions):
        """One action per active env -> rewards, terminated, truncated (lists over those envs), the final
        (obs, info) of truncated episodes by env index, and the returns of the episodes that ended."""
        rewards, terminated, truncated, finals, finished = [], [], [], {}, []
        for i, a in zip(list(self.active), actions):
            obs, r, term, trunc, info = self.envs[i].step(a)
            self.returns[i] += r
            rewards.append(float(r))
            terminated.append(term)
            truncated.append(trunc)
            if trunc and not term:
                finals[i] = (obs, info)
            self.obs[i], self.infos[i] = obs, info
            if term or trunc:
                finished.append(self.returns[i])
                self.restart(i)
        return rewards, terminated, truncated, finals, finished
