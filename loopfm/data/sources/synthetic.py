"""``synthetic``: a TaobaoAd-like impression log with a planted, documented click model.

This is the project's embedded default (``configs/quickstart.yaml``): nothing is downloaded, the
same config and seed give the same rows, and ``rows`` scales everything that should scale.

Shape of the data
-----------------
``rows`` ad impressions of ``users`` users (default ``rows // 40``, at least 25, so a user has
~40 events on average over the period and has a past when LoopFM builds its sequences) and
``ads`` ads (default ``rows // 20``, at least 200) over ``days`` (default 8) consecutive UTC calendar days starting at
``start_date`` 00:00 UTC. Day rule: ``DayRule("calendar", tz="UTC")``; a user's sessions fall
on uniform days, no event leaves its day, and every day is checked non-empty before the first row,
so the log has exactly ``days`` days. Chunks come out in time order (``ts`` non-decreasing), so
the input order is the example-id order of the prepared log.

Generative model (all draws from ``numpy.random.Generator`` streams derived from
``(seed, seed_offset)``: the per-user and per-ad state from a few streams up front, then the log
day by day, one stream per day for its impression times and behaviours and one per block of
65,536 rows of a day for the rest, so the output does not depend on ``chunk_rows``. The rows
differ from those of the generator before it streamed, which placed every impression and
behaviour of the whole period at once)
----------------------------------------------------------------------------------------------
Notation: ``K = latent_dim``; ``C = categories``; ``J = content_categories``; ``Zipf(n, s)``
is ``p(rank r) ∝ r^-s`` over ``n`` ids whose ranks are a random permutation of the ids.

World.
* category popularity ``p_cat = Zipf(C, zipf_categories)``; category embedding
  ``φ_c = g/|g|``, ``g ~ N(0, I_K)`` (unit vectors); typical log-price ``m_c ~ N(4, 1)``.
* brands: each brand belongs to one category (the first ``C`` brands cover every category, the
  rest are drawn from ``p_cat``); within a category a brand is drawn ∝ ``Zipf(brands,
  zipf_brands)`` weights.
* ads: ``customers = max(1, ads // 4)`` advertisers, each with a category ~ ``p_cat`` and a brand
  of that category (missing with probability 0.1, as brand is often missing in TaobaoAd);
  ``campaigns = max(1, ads // 2)``, each owned by a uniform customer; each ad belongs to a uniform
  campaign and takes its customer's brand and (with probability 0.85, else a fresh draw from
  ``p_cat``) category. ``price_a = round(exp(m_c + N(0, 0.6²)), 2)`` clipped to [0.5, 1e5].
  Ad quality ``q_a = 0.25 ε_customer + 0.2 ε_campaign + 0.25 ε_ad`` (all ``N(0, 1)``).
* content categories (the organic, cross-domain taxonomy, its own vocabulary):
  ``χ_j`` unit vectors in ``R^K``.

Users.
* activity ``p_user = Zipf(users, zipf_users)``; events per user ``n ~ Multinomial(rows, p_user)``.
* profile (TaobaoAd codes): ``gender`` ∈ {1, 2} (P = .35/.65); ``age_level`` ∈ 0..6;
  ``cms_group_id = 7 (gender - 1) + age_level`` (0..13); ``cms_segid`` = 0 with P .85, else
  Zipf over 1..96; ``pvalue_level`` ∈ 1..3 (missing with P .3); ``shopping_level`` ∈ 1..3,
  from the user's activity rank plus noise (bottom ~10 % -> 1, next ~15 % -> 2, rest -> 3);
  ``occupation`` ∈ {0, 1} (P(1) = .06); ``new_user_class_level`` ∈ 1..4 (missing with P .25).
* latent interest ``θ_u = μ_{cms_group_id} + s_u + x_u`` with
  ``μ_g ~ N(0, interest_profile_std² I)`` (shared by a profile group: the part a VM can read
  through the profile), ``s_u ~ N(0, interest_history_std² I)`` (the "shopping" part, visible
  only through the behaviour history) and ``x_u ~ N(0, interest_cross_domain_std² I)`` (the
  "cross-domain" part, visible only through the cross-domain features).
* propensity ``r_u = 0.25 (shopping_level - 3) + 0.15 occupation + 0.5 η_u``, ``η_u ~ N(0, 1)``
  hidden (visible only through the cross-domain engagement counts).
* favourite brands ``F_u``: 3 brands, each drawn as a category ~ ``p_hist(c|u)`` (below) and a
  brand of that category by brand popularity.

Behaviour history (the FM's ``hist_*`` features, like TaobaoAd's behavior_log).
* ``p_hist(c|u) ∝ p_cat(c)^0.5 exp(2 a_uc)``, ``a_uc = <(μ_g + s_u)/σ_h, φ_c>``,
  ``σ_h = sqrt(interest_profile_std² + interest_history_std²)``.
* each behaviour is, with P 0.3, on a favourite brand ``f ~ U(F_u)`` (category = its category),
  else category ~ ``p_hist(·|u)`` and brand ~ brand popularity within the category.
* btag: non-pv with ``P = sigmoid(-2.5 + 0.8 a_uc + 1.0·[favourite])``, split cart/fav/buy
  0.4/0.3/0.3; coded 1 = pv, 2 = cart, 3 = fav, 4 = buy (the TaobaoAd_x1/DMR coding).
* times: ``floor(history_len · sqrt(U(0,1)))`` behaviours in the 14 days before the period,
  plus, each day, ``Poisson(behaviours_per_event · n_ud)`` for a user with ``n_ud`` impressions
  that day, each 1..300 s before a uniform one of them (not before the day's 00:00). An
  impression's history is the user's behaviours strictly earlier than it (``t_b < t``; ties in
  draw order), newest last, at most ``history_len`` kept: the newest of a per-user buffer of the
  ``history_len`` newest behaviours before the day, then the day's own earlier ones.

Cross-domain features (the FM's extra "organic content" features).
* ``xd_views_7d ~ Poisson(exp(2 + 0.7 η_u))``, ``xd_likes_7d ~ Poisson(exp(0.3 + 0.7 η_u +
  0.3 ν_u))``: noisy views of the hidden propensity ``η_u``.
* ``xd_content_cate``: ``min(cross_domain_len, 4 xd_views_7d)`` content categories (the
  user's recent organic views over ~30 days; empty for users without any) drawn from
  ``p(j|u) ∝ exp(2 <x_u/σ_x, χ_j>)``, ``σ_x = interest_cross_domain_std``: a noisy view of
  ``x_u``, the part of the interest nothing else reveals. Fixed per user over the period.

Impressions.
* sessions: a user with ``n`` impressions has ``1 + Binomial(n - 1, 1/session_events)``
  sessions, each on a uniform day, starting at a second of the day drawn from a diurnal curve
  (quiet at night, peaks around 10-12h and 19-22h UTC); each impression joins a uniform session of
  its user and follows the previous one of its session after ``1 + Exp(30 s)`` seconds. Drawn
  day by day: day ``d`` takes ``Binomial(sessions left, 1/(days - d))`` of the user's sessions and
  ``Binomial(impressions left, those sessions / sessions left)`` of its impressions. Times are
  clipped to the last second of their day.
* ad ``a ~ Zipf(ads, zipf_ads)`` (independent of the user); ``pid`` ∈ {430548_1007 (P .55),
  430539_1007 (P .45)}.
* click: ``label ~ Bernoulli(sigmoid(ℓ))`` with

      ℓ = β0 + interest_weight <θ_u, φ_{c(a)}> + brand_loyalty [b(a) ∈ F_u]
             + q_a + r_u + π_pid - 0.2 (log price_a - m_{c(a)}),

  ``π`` = 0 / -0.3 for the two pids, and ``β0`` solved (bisection on 200k sampled pairs) so the
  expected CTR is ``ctr``.

Features and who sees them
--------------------------
VM-visible (fm_only = False): ``user_id`` (user key), the profile fields ``cms_segid,
cms_group_id, gender, age_level, pvalue_level, shopping_level, occupation,
new_user_class_level`` (carry ``μ_g`` and the visible propensity), the ad fields ``adgroup_id``
(item key), ``cate_id, campaign_id, customer, brand, price`` (carry ``q_a``, the price effect and
the category/brand that the interest acts on) and the context ``pid``. A VM can learn ``θ_u``,
``F_u`` and ``η_u`` only by memorising ``user_id`` from a few dozen impressions.

FM-only (fm_only = True): the behaviour history ``hist_cate_id`` (vocabulary of ``cate_id``),
``hist_brand`` (vocabulary of ``brand``), ``hist_btag`` (group "history"; they reveal ``μ_g + s_u``
and ``F_u``) and the cross-domain features ``xd_content_cate`` (own vocabulary), ``xd_views_7d``,
``xd_likes_7d`` (group "cross_domain"; they reveal ``x_u`` and ``η_u``). As in the MovieLens setup,
the FM reads the behaviour history and the VMs see ids only; a VM gets the user's history only
through LoopFM sequences (the FM embeddings of the user's strictly earlier impressions, which
encode these features) or a raw-id sequence built later. So the FM is clearly better than a VM
on the VM-visible features, and a LoopFM sequence can give a VM back part of the gap.

What to expect (default config, 200k rows, seed 0; small factorization machines, dimension 8,
trained 2 epochs on one CPU core): the true click probabilities reach AUC ~0.88 on day 8; an FM
on all features trained on days 1-4 reaches ~0.68; a model on the VM-visible features trained on
days 5-7 reaches ~0.61, and ~0.66 when it also gets the mean of the FM's user-side vectors of the
user's strictly earlier day-5..8 impressions (a crude LoopFM sequence); the true-probability
AUC is unchanged by the day-by-day generation (0.884), the model AUCs above were measured before
it. Generation runs at roughly 230k rows/s on one core (1M rows in ~4.5 s, 4M in ~18 s).
Memory: what is carried from day to day is per user or per ad only (profile and interest
vectors, favourite brands, the cross-domain sequence, impressions and sessions left, and a
history buffer of ``history_len`` behaviours: ~8 bytes an entry), plus one day in flight
(its impressions' users and times, its behaviours) and one block of output rows; with ``users``
and ``ads`` fixed, more rows grow only the day in flight (tests/data/test_synthetic.py).

Raw values: ids are integers starting at 1; missing ``pvalue_level``, ``new_user_class_level``
and ``brand`` are nulls; ``price`` and the counts are floats; sequences are integer lists,
newest last. Options: every ``SyntheticConfig`` field below (no skip options: ``skipped`` is
always empty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterator

import numpy as np
import pyarrow as pa

from loopfm.data.history import Timeline, gather, timeline_order
from loopfm.data.schema import FeatureSpec
from loopfm.data.source import DayRule, SourceInfo

BLOCK_ROWS = 65_536  # rows per generation block (one RNG stream each); independent of chunk_rows
HISTORY_SLICE = 8_192  # rows whose histories are gathered at once (bounds index temporaries)
CALIBRATION_PAIRS = 200_000
USER_BLOCK = 8_192  # users per block when sampling behaviour categories (bounds U x C memory)
# Grouped draws (_draw_grouped) are worked on SLICE_ROWS at a time to bound temporaries; only
# Generator.random() is drawn in slices there: it takes one 64-bit word per value, so the slices
# draw exactly the values of one call (bounded integers would not: they buffer 32-bit halves).
SLICE_ROWS = 1 << 20
TIME_BITS = 23  # days (+ pre-period) must fit 2^23 s (97 days): buffered times are int32 seconds

PID_VALUES = ("430548_1007", "430539_1007")
PID_PROBS = (0.55, 0.45)
PID_EFFECT = (0.0, -0.3)
AGE_PROBS = (0.01, 0.08, 0.25, 0.32, 0.20, 0.10, 0.04)
PVALUE_PROBS = (0.35, 0.55, 0.10)
NEW_USER_PROBS = (0.10, 0.35, 0.30, 0.25)
MISSING_PVALUE, MISSING_NEW_USER, MISSING_BRAND = 0.30, 0.25, 0.10
FAVOURITES, FAVOURITE_SHARE = 3, 0.3
NON_PV_SPLIT = (0.4, 0.3, 0.3)  # cart, fav, buy
SESSION_GAP_S = 30.0
PRE_PERIOD_S = 14 * 86_400
BEHAVIOUR_LEAD_S = 300
# Relative traffic per UTC hour (night trough, late-morning and evening peaks).
HOUR_WEIGHTS = (3.0, 2.0, 1.2, 0.8, 0.7, 0.9, 1.5, 2.5, 3.5, 4.5, 5.0, 5.0,
                5.5, 5.0, 4.8, 5.0, 5.0, 4.8, 5.0, 6.0, 7.0, 7.5, 6.0, 4.5)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class SyntheticConfig:
    """TaobaoAd-like generator; see the module docstring for the planted click model."""
    rows: int = field(default=200_000, metadata=_help("number of impressions generated"))
    users: int = field(default=0, metadata=_help("number of users; 0 = rows // 40 (at least 25)"))
    ads: int = field(default=0, metadata=_help("number of ads (adgroup_id); 0 = rows // 20 (at least 200)"))
    categories: int = field(default=100, metadata=_help("number of ad categories (cate_id)"))
    brands: int = field(default=1_000, metadata=_help("number of brands (>= categories)"))
    content_categories: int = field(default=64, metadata=_help(
        "size of the cross-domain content taxonomy (xd_content_cate)"))
    latent_dim: int = field(default=8, metadata=_help("dimension K of the latent interest space"))
    days: int = field(default=8, metadata=_help("consecutive UTC calendar days covered"))
    start_date: str = field(default="2017-05-06", metadata=_help(
        "first day, YYYY-MM-DD (UTC midnight); TaobaoAd starts on 2017-05-06"))
    ctr: float = field(default=0.05, metadata=_help("target click-through rate (sets the bias β0)"))
    history_len: int = field(default=50, metadata=_help(
        "behaviour-history length kept (max_len of hist_cate_id, hist_brand, hist_btag)"))
    cross_domain_len: int = field(default=20, metadata=_help(
        "max length of the cross-domain sequence xd_content_cate"))
    zipf_users: float = field(default=0.5, metadata=_help("Zipf exponent of user activity"))
    zipf_ads: float = field(default=1.05, metadata=_help("Zipf exponent of ad impressions"))
    zipf_categories: float = field(default=1.0, metadata=_help("Zipf exponent of category popularity"))
    zipf_brands: float = field(default=1.0, metadata=_help("Zipf exponent of brand popularity"))
    session_events: float = field(default=4.0, metadata=_help("mean impressions per session (>= 1)"))
    behaviours_per_event: float = field(default=1.0, metadata=_help(
        "mean in-period behaviours (history entries) per impression of a user"))
    interest_weight: float = field(default=1.5, metadata=_help(
        "weight of the interest term <θ_u, φ_cate> in the click logit"))
    brand_loyalty: float = field(default=1.0, metadata=_help(
        "logit bonus when the ad's brand is one of the user's favourite brands"))
    interest_profile_std: float = field(default=0.3, metadata=_help(
        "std of the profile-group interest μ_g (VM-visible through the profile)"))
    interest_history_std: float = field(default=0.8, metadata=_help(
        "std of the shopping interest s_u (visible only through hist_* features)"))
    interest_cross_domain_std: float = field(default=0.8, metadata=_help(
        "std of the cross-domain interest x_u (visible only through xd_* features)"))
    seed_offset: int = field(default=0, metadata=_help(
        "added to the run seed: a different data draw with the same model seed"))

    def __post_init__(self) -> None:
        if self.rows < 1000:
            raise ValueError(f"synthetic.rows must be >= 1000 (to fill every day), got {self.rows}")
        for name in ("users", "ads"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic.{name} must be >= 0 (0 = derived from rows), "
                                 f"got {getattr(self, name)}")
        if self.users and self.users > self.rows:
            raise ValueError(f"synthetic.users ({self.users}) must be <= rows ({self.rows})")
        for name in ("categories", "brands", "content_categories", "latent_dim", "days",
                     "history_len", "cross_domain_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if self.brands < self.categories:
            raise ValueError(f"synthetic.brands ({self.brands}) must be >= categories "
                             f"({self.categories}): every category needs a brand")
        if self.days * 86_400 + PRE_PERIOD_S >= 2 ** TIME_BITS:
            raise ValueError(f"synthetic.days must be <= 80, got {self.days}")
        if not 0.0 < self.ctr < 1.0:
            raise ValueError(f"synthetic.ctr must be in (0, 1), got {self.ctr}")
        try:
            date.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            raise ValueError(f"synthetic.start_date must be YYYY-MM-DD, got {self.start_date!r}") from None
        for name in ("zipf_users", "zipf_ads", "zipf_categories", "zipf_brands",
                     "behaviours_per_event", "interest_profile_std", "interest_history_std",
                     "interest_cross_domain_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic.{name} must be >= 0, got {getattr(self, name)}")
        if self.session_events < 1:
            raise ValueError(f"synthetic.session_events must be >= 1, got {self.session_events}")

    @property
    def num_users(self) -> int:
        return self.users or max(25, self.rows // 40)

    @property
    def num_ads(self) -> int:
        return self.ads or max(200, self.rows // 20)

    @property
    def start_ts(self) -> int:
        d = date.fromisoformat(self.start_date)
        return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp())


def _features(cfg: SyntheticConfig) -> list[FeatureSpec]:
    def cat(name, role, group, desc):
        return FeatureSpec(name, "categorical", role, group=group, description=desc)

    L, X = cfg.history_len, cfg.cross_domain_len
    return [
        cat("user_id", "user", "user_profile", "user key"),
        cat("cms_segid", "user", "user_profile", "micro group (0 for most users)"),
        cat("cms_group_id", "user", "user_profile",
            "7*(gender-1)+age_level; selects the profile-group interest mu_g"),
        cat("gender", "user", "user_profile", "1 male, 2 female"),
        cat("age_level", "user", "user_profile", "0..6"),
        cat("pvalue_level", "user", "user_profile", "consumption grade 1..3, often missing"),
        cat("shopping_level", "user", "user_profile", "1..3, from activity; shifts propensity"),
        cat("occupation", "user", "user_profile", "1 = college student; shifts propensity"),
        cat("new_user_class_level", "user", "user_profile", "1..4, often missing"),
        cat("adgroup_id", "item", "ad", "item key; ad quality q_a, Zipf impressions"),
        cat("cate_id", "item", "ad", "ad category; the interest term acts on it"),
        cat("campaign_id", "item", "ad", "campaign; part of q_a"),
        cat("customer", "item", "ad", "advertiser; part of q_a"),
        cat("brand", "item", "ad", "brand (missing for ~10% of ads); brand-loyalty term"),
        FeatureSpec("price", "numeric", "item", group="ad",
                    description="raw price; cheaper than the category's typical price -> more clicks"),
        cat("pid", "context", "context", "ad position; -0.3 logit for 430539_1007"),
        FeatureSpec("hist_cate_id", "sequence", "user", fm_only=True, vocab="cate_id", max_len=L,
                    group="history", description="categories of earlier behaviours; reveals mu_g+s_u"),
        FeatureSpec("hist_brand", "sequence", "user", fm_only=True, vocab="brand", max_len=L,
                    group="history", description="brands of earlier behaviours; reveals favourite brands"),
        FeatureSpec("hist_btag", "sequence", "user", fm_only=True, max_len=L, group="history",
                    description="behaviour type 1 pv, 2 cart, 3 fav, 4 buy; non-pv marks strong interest"),
        FeatureSpec("xd_content_cate", "sequence", "user", fm_only=True, max_len=X,
                    group="cross_domain",
                    description="organic-content categories the user engages with; reveals x_u"),
        FeatureSpec("xd_views_7d", "numeric", "user", fm_only=True, group="cross_domain",
                    description="organic content views, 7 days (count); reveals hidden propensity"),
        FeatureSpec("xd_likes_7d", "numeric", "user", fm_only=True, group="cross_domain",
                    description="organic content likes, 7 days (count); reveals hidden propensity"),
    ]


def _zipf(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities ∝ rank^-s over n ids whose ranks are a random permutation."""
    w = (rng.permutation(n) + 1.0) ** -s
    return w / w.sum()


def _unit_rows(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    g = rng.standard_normal((n, k))
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _draw(cdf: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Inverse-CDF draws from one distribution (``cdf`` ends at 1)."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _draw_grouped(flat_cdf: np.ndarray, group: np.ndarray, rng: np.random.Generator,
                  group_start: np.ndarray) -> np.ndarray:
    """One draw per entry of ``group`` from that group's distribution.

    ``flat_cdf`` concatenates every group's CDF shifted by the group index (group g's values lie
    in (g, g + 1], its last is exactly g + 1), so one ``searchsorted`` serves all groups. Returns
    the index into ``flat_cdf``, clipped into the group.
    """
    out = np.empty(len(group), dtype=np.int64)
    for s in range(0, len(group), SLICE_ROWS):  # same draws as one call (see SLICE_ROWS)
        g = group[s:s + SLICE_ROWS]
        u = rng.random(len(g)) * (1.0 - 1e-9)
        idx = np.searchsorted(flat_cdf, g + u, side="right")
        out[s:s + SLICE_ROWS] = np.clip(idx, group_start[g], group_start[g + 1] - 1)
    return out


def _cdf(p: np.ndarray) -> np.ndarray:
    c = np.cumsum(p, axis=-1)
    c /= c[..., -1:]
    c[..., -1] = 1.0
    return c


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _nullable(values: np.ndarray, missing: np.ndarray | None) -> pa.Array:
    return pa.array(values, mask=missing) if missing is not None else pa.array(values)


class _World:
    """Everything drawn once, all O(users + ads): catalogue, users (profile, interest, favourite
    brands, impression and session counts) and β0. The rows come from `_Stream`."""

    def __init__(self, cfg: SyntheticConfig, seed: int) -> None:
        self.cfg = cfg
        self.root = root = [seed % 2 ** 63, cfg.seed_offset % 2 ** 63]
        rng = np.random.default_rng(np.random.SeedSequence(root + [0]))
        self._catalogue(cfg, rng)
        self._users(cfg, rng)
        self._activity(cfg, np.random.default_rng(np.random.SeedSequence(root + [1])))
        self._favourites(cfg, np.random.default_rng(np.random.SeedSequence(root + [2])))
        self._calibrate(cfg, np.random.default_rng(np.random.SeedSequence(root + [3])))
        self.day_rows = [int(n.sum()) for _, n in self.day_counts()]
        empty = [d + 1 for d, n in enumerate(self.day_rows) if n == 0]
        if empty:  # cannot happen with the defaults; guard the promise of `days` days anyway
            raise RuntimeError(f"synthetic: day(s) {empty} of {cfg.days} get no impression; "
                               "increase synthetic.rows")

    # -- catalogue: categories, brands, customers, campaigns, ads, content taxonomy -------------
    def _catalogue(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        C, B, A, K = cfg.categories, cfg.brands, cfg.num_ads, cfg.latent_dim
        self.p_cat = _zipf(C, cfg.zipf_categories, rng)
        cat_cdf = _cdf(self.p_cat)
        self.phi = _unit_rows(C, K, rng)
        self.cat_logprice = rng.normal(4.0, 1.0, C)
        brand_cat = np.concatenate([rng.permutation(C), _draw(cat_cdf, rng, B - C)])
        brand_w = _zipf(B, cfg.zipf_brands, rng)
        # Brands sorted by category, one shifted CDF per category (see _draw_grouped).
        self.brand_by_cat = np.lexsort((np.arange(B), brand_cat))
        sorted_cat = brand_cat[self.brand_by_cat]
        self.brand_cat_start = np.searchsorted(sorted_cat, np.arange(C + 1))
        w = brand_w[self.brand_by_cat]
        cs = np.cumsum(w)
        before = np.concatenate([[0.0], cs])[self.brand_cat_start[:-1]]
        total = np.add.reduceat(w, self.brand_cat_start[:-1])
        within = (cs - before[sorted_cat]) / total[sorted_cat]
        within[self.brand_cat_start[1:] - 1] = 1.0
        self.brand_flat_cdf = sorted_cat + within
        self.brand_cat = brand_cat

        n_cust, n_camp = max(1, A // 4), max(1, A // 2)
        cust_cat = _draw(cat_cdf, rng, n_cust)
        cust_brand = self.brand_of(cust_cat, rng)
        cust_brand_missing = rng.random(n_cust) < MISSING_BRAND
        camp_cust = rng.integers(0, n_cust, n_camp)
        ad_camp = rng.integers(0, n_camp, A)
        ad_cust = camp_cust[ad_camp]
        own_cat = rng.random(A) < 0.85
        self.ad_cat = np.where(own_cat, cust_cat[ad_cust], _draw(cat_cdf, rng, A))
        self.ad_brand = cust_brand[ad_cust]
        self.ad_brand_missing = cust_brand_missing[ad_cust]
        self.ad_camp, self.ad_cust = ad_camp, ad_cust
        log_price = self.cat_logprice[self.ad_cat] + rng.normal(0.0, 0.6, A)
        self.ad_price = np.clip(np.round(np.exp(log_price), 2), 0.5, 1e5)
        self.ad_quality = (0.25 * rng.standard_normal(n_cust)[ad_cust]
                           + 0.2 * rng.standard_normal(n_camp)[ad_camp]
                           + 0.25 * rng.standard_normal(A))
        self.ad_price_effect = -0.2 * (np.log(self.ad_price) - self.cat_logprice[self.ad_cat])
        self.ad_cdf = _cdf(_zipf(A, cfg.zipf_ads, rng))
        self.chi = _unit_rows(cfg.content_categories, K, rng)

    def brand_of(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A brand of each given category, by brand popularity within the category."""
        return self.brand_by_cat[_draw_grouped(self.brand_flat_cdf, cats, rng, self.brand_cat_start)]

    # -- users: profile, latent interest, propensity, cross-domain features ---------------------
    def _users(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        U, K = cfg.num_users, cfg.latent_dim
        self.p_user = _zipf(U, cfg.zipf_users, rng)
        self.gender = 1 + (rng.random(U) < 0.65).astype(np.int64)
        self.age = _draw(_cdf(np.array(AGE_PROBS)), rng, U)
        self.group = 7 * (self.gender - 1) + self.age
        seg_w = (np.arange(96) + 1.0) ** -1.0
        self.segid = np.where(rng.random(U) < 0.85, 0, 1 + _draw(_cdf(seg_w), rng, U))
        self.pvalue = 1 + _draw(_cdf(np.array(PVALUE_PROBS)), rng, U)
        self.pvalue_missing = rng.random(U) < MISSING_PVALUE
        activity = np.log(self.p_user) + 0.5 * rng.standard_normal(U)
        q10, q25 = np.quantile(activity, [0.10, 0.25])
        self.shopping = np.where(activity < q10, 1, np.where(activity < q25, 2, 3))
        self.occupation = (rng.random(U) < 0.06).astype(np.int64)
        self.new_user = 1 + _draw(_cdf(np.array(NEW_USER_PROBS)), rng, U)
        self.new_user_missing = rng.random(U) < MISSING_NEW_USER

        mu = rng.normal(0.0, cfg.interest_profile_std, (14, K))
        s = rng.normal(0.0, cfg.interest_history_std, (U, K))
        x = rng.normal(0.0, cfg.interest_cross_domain_std, (U, K))
        self.hist_interest = mu[self.group] + s  # what the behaviour history reveals
        self.theta = self.hist_interest + x
        eta = rng.standard_normal(U)
        self.propensity = 0.25 * (self.shopping - 3) + 0.15 * self.occupation + 0.5 * eta
        self.views = rng.poisson(np.exp(2.0 + 0.7 * eta)).astype(np.float64)
        self.likes = rng.poisson(np.exp(0.3 + 0.7 * eta + 0.3 * rng.standard_normal(U))).astype(np.float64)

        # Cross-domain content sequence: a fixed per-user draw from p(j|u) ∝ exp(2 <x_u/σ_x, χ_j>).
        X, J = cfg.cross_domain_len, cfg.content_categories
        sx = cfg.interest_cross_domain_std or 1.0
        logits = 2.0 * (x / sx) @ self.chi.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        flat = (np.arange(U)[:, None] + _cdf(p)).ravel()
        starts = np.arange(U + 1) * J
        users = np.repeat(np.arange(U), X)
        self.xd_seq = (_draw_grouped(flat, users, rng, starts) - users * J).reshape(U, X)
        self.xd_len = np.minimum(X, 4 * self.views).astype(np.int64)

    # -- how many impressions and sessions each user has, in all and per day --------------------
    def _activity(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        n_u = rng.multinomial(cfg.rows, self.p_user)
        self.n_u = n_u
        self.sess_u = np.where(n_u > 0, 1 + rng.binomial(np.maximum(n_u - 1, 0), 1.0 / cfg.session_events), 0)

    def day_counts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per day, each user's (sessions, impressions) that day: the sessions fall on uniform
        days and the impressions into uniform sessions, drawn as sequential binomials (one stream,
        replayed whenever the days are generated; O(users) state)."""
        D = self.cfg.days
        rng = np.random.default_rng(np.random.SeedSequence(self.root + [5]))
        sess_left, imp_left = self.sess_u.copy(), self.n_u.copy()
        for d in range(D):
            if d == D - 1:
                sess, imp = sess_left, imp_left
            else:
                sess = rng.binomial(sess_left, 1.0 / (D - d))
                share = np.divide(sess, sess_left, out=np.zeros(len(sess)), where=sess_left > 0)
                imp = rng.binomial(imp_left, share)
            sess_left, imp_left = sess_left - sess, imp_left - imp
            yield sess, imp

    # -- behaviours: favourite brands, then each behaviour's category, brand and type ----------
    def _favourites(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        self.hist_scale = math.hypot(cfg.interest_profile_std, cfg.interest_history_std) or 1.0
        self.log_pop = 0.5 * np.log(self.p_cat)
        fav_users = np.repeat(np.arange(cfg.num_users), FAVOURITES)
        fav_cat, _ = self.hist_categories(fav_users, rng)
        self.favourites = self.brand_of(fav_cat, rng).reshape(cfg.num_users, FAVOURITES)

    def hist_categories(self, b_user: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Per behaviour (``b_user`` ascending) a category ~ p_hist(c|u) and its affinity a_uc,
        worked on USER_BLOCK distinct users at a time (bounds the users x C CDFs)."""
        C, n = self.cfg.categories, len(b_user)
        first = np.flatnonzero(np.r_[True, b_user[1:] != b_user[:-1]]) if n else np.zeros(0, np.int64)
        run_end = np.r_[first[1:], n].astype(np.int64)
        cat, aff = np.empty(n, np.int64), np.empty(n)
        for g in range(0, len(first), USER_BLOCK):
            users = b_user[first[g:g + USER_BLOCK]]
            s0, s1 = first[g], run_end[min(g + USER_BLOCK, len(first)) - 1]
            a = (self.hist_interest[users] / self.hist_scale) @ self.phi.T  # a_uc
            logits = self.log_pop + 2.0 * a
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            flat = (np.arange(len(users))[:, None] + _cdf(p)).ravel()
            local = np.repeat(np.arange(len(users)), run_end[g:g + USER_BLOCK] - first[g:g + USER_BLOCK])
            cat[s0:s1] = _draw_grouped(flat, local, rng, np.arange(len(users) + 1) * C) - local * C
            aff[s0:s1] = a[local, cat[s0:s1]]
        return cat, aff

    def behaviours(self, b_user: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Category, brand and btag of behaviours of users ``b_user`` (ascending), as stored:
        ids + 1 in their narrowest integer types."""
        cat, aff = self.hist_categories(b_user, rng)
        n = len(b_user)
        brand = self.brand_of(cat, rng)
        on_fav = rng.random(n) < FAVOURITE_SHARE
        fav_brand = self.favourites[b_user, rng.integers(0, FAVOURITES, n)]
        brand = np.where(on_fav, fav_brand, brand)
        cat = np.where(on_fav, self.brand_cat[brand], cat)
        fav_rows = np.flatnonzero(on_fav)
        aff[fav_rows] = np.einsum("nk,nk->n", self.hist_interest[b_user[fav_rows]] / self.hist_scale,
                                  self.phi[cat[fav_rows]])
        non_pv = rng.random(n) < _sigmoid(-2.5 + 0.8 * aff + 1.0 * on_fav)
        btag = np.where(non_pv, 2 + _draw(_cdf(np.array(NON_PV_SPLIT)), rng, n), 1).astype(np.int8)
        return {"cat": (cat + 1).astype(np.min_scalar_type(self.cfg.categories)),
                "brand": (brand + 1).astype(np.min_scalar_type(self.cfg.brands)),
                "btag": btag}

    # -- bias β0 so that the expected CTR is cfg.ctr --------------------------------------------
    def _calibrate(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        m = CALIBRATION_PAIRS
        users = _draw(_cdf(self.p_user), rng, m)
        ads = _draw(self.ad_cdf, rng, m)
        pid = (rng.random(m) >= PID_PROBS[0]).astype(np.int64)
        z = self.logit_without_bias(users, ads, pid)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(mid + z).mean() < cfg.ctr:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)

    def logit_without_bias(self, users: np.ndarray, ads: np.ndarray, pid: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        interest = np.einsum("nk,nk->n", self.theta[users], self.phi[self.ad_cat[ads]])
        brand = self.ad_brand[ads]
        loyal = (self.favourites[users] == brand[:, None]).any(axis=1) & ~self.ad_brand_missing[ads]
        return (cfg.interest_weight * interest + cfg.brand_loyalty * loyal
                + self.ad_quality[ads] + self.propensity[users]
                + np.asarray(PID_EFFECT)[pid] + self.ad_price_effect[ads])

    def held_bytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


class _Day:
    """One day in flight: its impressions in time order and its behaviours in timeline order."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, b_user: np.ndarray, b_ts: np.ndarray,
                 b_values: dict[str, np.ndarray]) -> None:
        self.user, self.ts = user, ts  # int64; ts in seconds since the start
        self.b_user, self.b_ts, self.b_values = b_user, b_ts, b_values
        self.timeline = Timeline(b_user, b_ts)


class _Stream:
    """The log day by day. Carries, per user, the newest ``history_len`` behaviours before the
    current day (a left-aligned buffer, newest last) and the replayed day counts; nothing else
    outlives a day. ``record`` (tests) receives every behaviour table as it is drawn."""

    def __init__(self, world: _World, record: list | None = None) -> None:
        self.world, self.cfg, self.record = world, world.cfg, record
        cfg, U, L = world.cfg, world.cfg.num_users, world.cfg.history_len
        self.ring_len = np.zeros(U, np.int64)
        self.ring_ts = np.zeros((U, L), np.int32)  # seconds since the start (pre-period: < 0)
        self.ring = {"cat": np.zeros((U, L), np.min_scalar_type(cfg.categories)),
                     "brand": np.zeros((U, L), np.min_scalar_type(cfg.brands)),
                     "btag": np.zeros((U, L), np.int8)}
        self._pre_period()

    def held_bytes(self) -> int:
        """Bytes of the arrays carried between days (the world's and this stream's)."""
        own = self.ring_len.nbytes + self.ring_ts.nbytes + sum(v.nbytes for v in self.ring.values())
        return self.world.held_bytes() + own

    def _pre_period(self) -> None:
        """floor(history_len sqrt(U(0,1))) behaviours in the 14 days before the start, per user
        with impressions: at most history_len each, so they fill the buffer directly."""
        w, L = self.world, self.cfg.history_len
        rng = np.random.default_rng(np.random.SeedSequence(w.root + [6]))
        U = len(w.n_u)
        count = np.where(w.n_u > 0, np.floor(L * np.sqrt(rng.random(U))).astype(np.int64), 0)
        b_user = np.repeat(np.arange(U), count)
        b_ts = -rng.integers(1, PRE_PERIOD_S + 1, len(b_user))
        values = w.behaviours(b_user, rng)
        order = timeline_order(b_user, b_ts)
        b_user, b_ts = b_user[order], b_ts[order]
        values = {k: v[order] for k, v in values.items()}
        self._push(b_user, b_ts, values)

    def _push(self, b_user: np.ndarray, b_ts: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Append behaviours (timeline order) to their users' buffers, keeping the newest L."""
        if self.record is not None:
            self.record.append({"user": b_user, "ts": b_ts, **values})
        L = self.cfg.history_len
        if not len(b_user):
            return
        first = np.flatnonzero(np.r_[True, b_user[1:] != b_user[:-1]])
        users = b_user[first]
        count = np.diff(np.r_[first, len(b_user)])
        take_new = np.minimum(count, L)
        old_len = self.ring_len[users]
        take_old = np.minimum(old_len, L - take_new)
        # kept old entries: columns old_len - take_old .. old_len of the user's row -> 0..take_old
        src_old, _ = gather(users * L + old_len - take_old, users * L + old_len)
        dst_old, _ = gather(users * L, users * L + take_old)
        # newest take_new behaviours of the user -> columns take_old .. take_old + take_new
        src_new, _ = gather(first + count - take_new, first + count)
        dst_new, _ = gather(users * L + take_old, users * L + take_old + take_new)
        for buf, new in [(self.ring_ts, b_ts)] + [(self.ring[k], values[k]) for k in self.ring]:
            flat = buf.reshape(-1)
            kept = flat[src_old]  # a copy: the move may overlap its source
            flat[dst_old] = kept
            flat[dst_new] = new[src_new]
        self.ring_len[users] = take_old + take_new

    def _day(self, d: int, sess: np.ndarray, imp: np.ndarray) -> _Day:
        """Day ``d``'s impressions (sessions from the diurnal curve, 1 + Exp(30 s) gaps, clipped to
        the day) and its behaviours, each 1..300 s before a uniform impression of its user that day
        (but not before the day's start)."""
        w, cfg = self.world, self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(w.root + [7, d]))
        day0 = d * 86_400
        users = np.flatnonzero(imp)
        n, s = imp[users], sess[users]
        sess_first = np.concatenate([[0], np.cumsum(s)])
        hour = _draw(_cdf(np.array(HOUR_WEIGHTS)), rng, int(sess_first[-1]))
        sess_start = day0 + hour * 3600 + rng.integers(0, 3600, len(hour))
        N = int(n.sum())
        local = np.repeat(np.arange(len(users)), n)  # impressions grouped by user
        ev_sess = sess_first[local] + (rng.random(N) * s[local]).astype(np.int64)
        ev_sess.sort()  # sessions are numbered by user, so this keeps the user grouping
        gaps = 1 + np.floor(rng.exponential(SESSION_GAP_S, N)).astype(np.int64)
        cs = np.cumsum(gaps)
        first = np.flatnonzero(np.r_[True, ev_sess[1:] != ev_sess[:-1]])
        before = np.repeat(cs[first] - gaps[first], np.diff(np.r_[first, N]))
        ts = np.minimum(sess_start[ev_sess] + cs - before, day0 + 86_399)

        nb = rng.poisson(cfg.behaviours_per_event * n)
        b_local = np.repeat(np.arange(len(users)), nb)
        ev_first = np.concatenate([[0], np.cumsum(n)])
        pick = ev_first[b_local] + (rng.random(len(b_local)) * n[b_local]).astype(np.int64)
        b_ts = np.maximum(ts[pick] - rng.integers(1, BEHAVIOUR_LEAD_S + 1, len(pick)), day0)
        b_user = users[b_local]
        values = w.behaviours(b_user, rng)
        order = timeline_order(b_user, b_ts)
        time_order = np.argsort(ts, kind="stable")
        return _Day(users[local][time_order], ts[time_order], b_user[order], b_ts[order],
                    {k: v[order] for k, v in values.items()})

    def blocks(self) -> Iterator[pa.Table]:
        """Every row, day by day in time order, in blocks of at most BLOCK_ROWS (one RNG stream
        per (day, block))."""
        for d, (sess, imp) in enumerate(self.world.day_counts()):
            day = self._day(d, sess, imp)
            for b, s in enumerate(range(0, len(day.ts), BLOCK_ROWS)):
                yield self._block(day, d, b, slice(s, s + BLOCK_ROWS))
            self._push(day.b_user, day.b_ts, day.b_values)
            del day

    def _histories(self, day: _Day, users: np.ndarray, ts: np.ndarray) -> dict[str, pa.ListArray]:
        """Each impression's newest history_len behaviours strictly before it: the buffer (earlier
        days and the pre-period) followed by the day's own earlier behaviours."""
        L = self.cfg.history_len
        start, end = day.timeline.bounds(users, ts, max_len=L)
        today = end - start
        old = np.minimum(self.ring_len[users], L - today)
        offsets = np.zeros(len(users) + 1, np.int64)
        np.cumsum(old + today, out=offsets[1:])
        base = users * L + self.ring_len[users]
        keys = {"hist_cate_id": "cat", "hist_brand": "brand", "hist_btag": "btag"}
        values = {name: np.empty(offsets[-1], np.int32) for name in keys}
        for s in range(0, len(users), HISTORY_SLICE):  # bounds the int64 index temporaries
            sl = slice(s, s + HISTORY_SLICE)
            first = offsets[:-1][sl]  # each row's first output position
            src_old, _ = gather(base[sl] - old[sl], base[sl])
            dst_old, _ = gather(first, first + old[sl])
            src_new, _ = gather(start[sl], end[sl])
            dst_new, _ = gather(first + old[sl], first + old[sl] + today[sl])
            for name, key in keys.items():
                values[name][dst_old] = self.ring[key].reshape(-1)[src_old]
                values[name][dst_new] = day.b_values[key][src_new]
        off = pa.array(offsets.astype(np.int32))
        return {name: pa.ListArray.from_arrays(off, pa.array(v)) for name, v in values.items()}

    def _block(self, day: _Day, d: int, b: int, rows: slice) -> pa.Table:
        w, cfg = self.world, self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(w.root + [8, d, b]))
        users, ts = day.user[rows], day.ts[rows]
        n = len(users)
        ads = _draw(w.ad_cdf, rng, n)
        pid = (rng.random(n) >= PID_PROBS[0]).astype(np.int64)
        p = _sigmoid(w.bias + w.logit_without_bias(users, ads, pid))
        label = (rng.random(n) < p).astype(np.int8)
        hist = self._histories(day, users, ts)

        xd_start = users * cfg.cross_domain_len
        xd_idx, xd_off = gather(xd_start, xd_start + w.xd_len[users])
        xd_values = w.xd_seq.ravel()[xd_idx].astype(np.int32) + 1
        pid_arr = pa.DictionaryArray.from_arrays(pa.array(pid.astype(np.int8)),
                                                 pa.array(PID_VALUES)).dictionary_decode()
        return pa.table({
            "ts": pa.array(ts + np.int64(cfg.start_ts), pa.int64()),
            "label": pa.array(label),
            "user_id": pa.array(users + 1),
            "cms_segid": pa.array(w.segid[users]),
            "cms_group_id": pa.array(w.group[users]),
            "gender": pa.array(w.gender[users]),
            "age_level": pa.array(w.age[users]),
            "pvalue_level": _nullable(w.pvalue[users], w.pvalue_missing[users]),
            "shopping_level": pa.array(w.shopping[users]),
            "occupation": pa.array(w.occupation[users]),
            "new_user_class_level": _nullable(w.new_user[users], w.new_user_missing[users]),
            "adgroup_id": pa.array(ads + 1),
            "cate_id": pa.array(w.ad_cat[ads] + 1),
            "campaign_id": pa.array(w.ad_camp[ads] + 1),
            "customer": pa.array(w.ad_cust[ads] + 1),
            "brand": _nullable(w.ad_brand[ads] + 1, w.ad_brand_missing[ads]),
            "price": pa.array(w.ad_price[ads]),
            "pid": pid_arr,
            **hist,
            "xd_content_cate": pa.ListArray.from_arrays(pa.array(xd_off.astype(np.int32)), pa.array(xd_values)),
            "xd_views_7d": pa.array(w.views[users]),
            "xd_likes_7d": pa.array(w.likes[users]),
        })


class SyntheticSource:
    """TaobaoAd-like impressions with a planted click model (see the module docstring)."""

    def __init__(self, cfg: SyntheticConfig, *, seed: int, chunk_rows: int) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.cfg, self.seed, self.chunk_rows = cfg, int(seed), int(chunk_rows)
        self.skipped: dict[str, int] = {}
        self._world: _World | None = None

    def info(self) -> SourceInfo:
        return SourceInfo(dataset="synthetic", user_key="user_id", item_key="adgroup_id",
                          features=_features(self.cfg),
                          days=DayRule("calendar", num_days=self.cfg.days, tz="UTC"))

    def world(self) -> _World:
        """The per-user and per-ad state (drawn once, on first use)."""
        if self._world is None:
            self._world = _World(self.cfg, self.seed)
        return self._world

    def stream(self, record: list | None = None) -> _Stream:
        """A fresh day-by-day generator of the rows (``record``: see `_Stream`)."""
        return _Stream(self.world(), record)

    def chunks(self) -> Iterator[pa.Table]:
        pending: list[pa.Table] = []
        buffered = 0
        for block in self.stream().blocks():
            pending.append(block)
            buffered += block.num_rows
            while buffered >= self.chunk_rows:
                merged = pa.concat_tables(pending)
                yield merged.slice(0, self.chunk_rows)
                rest = merged.slice(self.chunk_rows)
                pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
        if buffered:
            yield pa.concat_tables(pending)
