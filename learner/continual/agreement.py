"""Do a model's answers agree with a set of labels more than chance would? The exact permutation
test the gate uses to tell corrections that carry something learnable from noise.

Null hypothesis: the labels are independent of the answers. Conditioned on how often each label
occurs and how often each answer is given (both margins fixed, as in Fisher's exact test), every
assignment of the n labels to the n clips is then equally likely, and the number of clips whose
answer equals their label (the agreements) has an exact distribution: the number of permutations
of n with exactly j "hits" on the board made of one a_l x b_l block per label (a_l clips answered
l, b_l labelled l). Rook theory counts them: with r_k the number of ways to place k non-attacking
rooks on the board (the blocks multiply as polynomials: r_k(a x b) = C(a,k) C(b,k) k!),

    N_j = sum_{k >= j} (-1)^(k-j) C(k, j) r_k (n-k)!        P(agreements >= m) = sum_{j>=m} N_j / n!

computed here in exact integers (n is the held-out share of one round: at most a few hundred).
The test is one-sided (more agreement than chance); its p-value is exact, not a normal or
binomial approximation, so it stays valid on a handful of clips.
"""
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import comb, factorial


@dataclass(frozen=True)
class Agreement:
    """How a model's answers agree with the labels of the same clips."""
    n: int
    agreements: int  # clips answered with their label
    expected: float  # agreements expected if labels were independent of answers

    @classmethod
    def of(cls, labels: Sequence[str], answers: Sequence[str]) -> "Agreement":
        a, b = Counter(answers), Counter(labels)
        n = len(labels)
        return cls(n, sum(t == x for t, x in zip(labels, answers)),
                   sum(a[label] * b[label] for label in b) / n if n else 0.0)

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: the share of the agreement beyond chance that was reached."""
        if not self.n or self.expected >= self.n:
            return None
        return (self.agreements - self.expected) / (self.n - self.expected)


def agreement_tail(labels: Sequence[str], answers: Sequence[str]) -> list[float]:
    """tail[m] = P(agreements >= m) for m = 0..n under the null, the margins of `labels` and
    `answers` fixed."""
    n = len(labels)
    a, b = Counter(answers), Counter(labels)
    rooks = [1]  # the board's rook polynomial, one block per label both margins have
    for label in b:
        block = [comb(a[label], k) * comb(b[label], k) * factorial(k)
                 for k in range(min(a[label], b[label]) + 1)]
        rooks = _multiply(rooks, block)
    hits = [sum((-1) ** (k - j) * comb(k, j) * rooks[k] * factorial(n - k)
                for k in range(j, len(rooks))) for j in range(n + 1)]
    total, tail, running = factorial(n), [0.0] * (n + 2), 0
    for j in range(n, -1, -1):
        running += hits[j]
        tail[j] = float(Fraction(running, total))
    return tail[:n + 1]


def agreement_p_value(labels: Sequence[str], answers: Sequence[str]) -> float:
    """One-sided exact p-value of 'the answers agree with the labels no more than chance'."""
    if not labels:
        return 1.0
    return agreement_tail(labels, answers)[Agreement.of(labels, answers).agreements]


def required_agreements(labels: Sequence[str], answers: Sequence[str],
                        alpha: float) -> int | None:
    """The fewest agreements that would be significant at `alpha` with these margins; None if
    not even agreeing on every clip the margins allow would be."""
    if not labels:
        return None
    return next((m for m, p in enumerate(agreement_tail(labels, answers)) if 0 < p <= alpha),
                None)  # p = 0: more agreements than the margins allow


def best_p_value(labels: Sequence[str]) -> float:
    """The p-value of answers agreeing with every label: prod(b_l!) / n!, the smallest any
    answers can reach on these labels. Above alpha, no model could show agreement on them."""
    n = len(labels)
    if not n:
        return 1.0
    ways = 1
    for count in Counter(labels).values():
        ways *= factorial(count)
    return float(Fraction(ways, factorial(n)))


def _multiply(p: list[int], q: list[int]) -> list[int]:
    out = [0] * (len(p) + len(q) - 1)
    for i, x in enumerate(p):
        for j, y in enumerate(q):
            out[i + j] += x * y
    return out
