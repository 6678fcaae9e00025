"""``synthetic``: a TaobaoAd-like impression log with a planted, documented click model.

This is the project's embedded default (``configs/quickstart.yaml``): nothing is downloaded, the
same config and seed give the same rows, and ``rows`` scales everything that should scale.

Shape of the data
-----------------
``rows`` ad impressions of ``users`` users (default ``rows // 40``, at least 25, so a user has
~40 events on average over the period and has a past when LoopFM builds its sequences) and
``ads`` ads (default ``rows // 20``, at least 200) over ``days`` (default 8) consecutive UTC calendar days starting at
``start_date`` 00:00 UTC. Day rule: ``DayRule("calendar", tz="UTC")``; every day gets an equal
share of sessions and no event is placed after the last day, so the log has exactly ``days``
days. Chunks come out in time order (``ts`` non-decreasing), so the input order is the
example-id order of the prepared log.

Generative model (all draws from ``numpy.random.Generator`` streams derived from
``(seed, seed_offset)``; the per-row part is generated in fixed blocks of 65,536 rows with one
stream per block, so the output does not depend on ``chunk_rows``)
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
  plus ``Poisson(behaviours_per_event · n_u)`` during it, each 1..300 s before a random
  impression of the user. An impression's history is the user's behaviours strictly earlier
  than it (``t_b < t``), newest last, at most ``history_len`` kept.

Cross-domain features (the FM's extra "organic content" features).
* ``xd_views_7d ~ Poisson(exp(2 + 0.7 η_u))``, ``xd_likes_7d ~ Poisson(exp(0.3 + 0.7 η_u +
  0.3 ν_u))``: noisy views of the hidden propensity ``η_u``.
* ``xd_content_cate``: ``min(cross_domain_len, 4 xd_views_7d)`` content categories (the
  user's recent organic views over ~30 days; empty for users without any) drawn from
  ``p(j|u) ∝ exp(2 <x_u/σ_x, χ_j>)``, ``σ_x = interest_cross_domain_std``: a noisy view of
  ``x_u``, the part of the interest nothing else reveals. Fixed per user over the period.

Impressions.
* sessions: a user with ``n`` impressions has ``1 + Binomial(n - 1, 1/session_events)``
  sessions, spread evenly over the days (session day = a random permutation of the sessions mod
  ``days``), starting at a second of the day drawn from a diurnal curve (quiet at night, peaks
  around 10-12h and 19-22h UTC); each impression joins a uniform session of its user and follows
  the previous one of its session after ``1 + Exp(30 s)`` seconds. Times are clipped to the last
  second of the period.
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
user's strictly earlier day-5..8 impressions (a crude LoopFM sequence). Generation runs at
roughly 150-200k rows/s on one core (1M rows in ~5-7 s); the per-user tables are built once.
Memory: the world (per-user and per-ad tables, each impression's user and time, each behaviour's
search code, category, brand and type: ~44 bytes a row in all with the default config, ~1.8
behaviours a row) is held while the rows are generated and freed after the last chunk; building
it peaks at ~150 bytes a row over the interpreter's own memory (measured at 2M rows).

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
CALIBRATION_PAIRS = 200_000
USER_BLOCK = 8_192  # users per block when sampling behaviour categories (bounds U x C memory)
# Arrays over all behaviours are worked on SLICE_ROWS at a time where that bounds temporaries;
# only Generator.random() is drawn in slices there: it takes one 64-bit word per value, so the
# slices draw exactly the values of one call (bounded integers would not: they buffer 32-bit halves).
SLICE_ROWS = 1 << 20
TIME_BITS = 23  # days (+ pre-period) must fit 2^23 s (97 days): the generator's documented range

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
    """Everything not per-row: users, ads, behaviour streams, the event skeleton, β0."""

    def __init__(self, cfg: SyntheticConfig, seed: int) -> None:
        self.cfg = cfg
        self.root = root = [seed % 2 ** 63, cfg.seed_offset % 2 ** 63]
        rng = np.random.default_rng(np.random.SeedSequence(root + [0]))
        self._catalogue(cfg, rng)
        self._users(cfg, rng)
        self._skeleton(cfg, np.random.default_rng(np.random.SeedSequence(root + [1])))
        self._behaviours(cfg, np.random.default_rng(np.random.SeedSequence(root + [2])))
        self._calibrate(cfg, np.random.default_rng(np.random.SeedSequence(root + [3])))

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

    # -- impressions: users and timestamps, in time order ---------------------------------------
    def _skeleton(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        N, U = cfg.rows, cfg.num_users
        n_u = rng.multinomial(N, self.p_user)
        sess_u = np.where(n_u > 0, 1 + rng.binomial(np.maximum(n_u - 1, 0), 1.0 / cfg.session_events), 0)
        sess_start_u = np.concatenate([[0], np.cumsum(sess_u)])
        S = int(sess_start_u[-1])
        sess_day = rng.permutation(S) % cfg.days
        hour = _draw(_cdf(np.array(HOUR_WEIGHTS)), rng, S)
        sess_start = (cfg.start_ts + sess_day * 86_400 + hour * 3600 + rng.integers(0, 3600, S))
        ev_user = np.repeat(np.arange(U), n_u)
        ev_sess = sess_start_u[ev_user] + (rng.random(N) * sess_u[ev_user]).astype(np.int64)
        ev_sess.sort()  # events are grouped by user already; sessions are numbered by user
        gaps = 1 + np.floor(rng.exponential(SESSION_GAP_S, N)).astype(np.int64)
        cs = np.cumsum(gaps)
        first = np.flatnonzero(np.r_[True, ev_sess[1:] != ev_sess[:-1]])
        before = np.repeat(cs[first] - gaps[first], np.diff(np.r_[first, N]))
        end_ts = cfg.start_ts + cfg.days * 86_400
        ts = np.minimum(sess_start[ev_sess] + cs - before, end_ts - 1)
        self.n_u = n_u
        self.ev_start_u = np.concatenate([[0], np.cumsum(n_u)])
        self.ts_by_user = ts  # grouped by user (user-major), for behaviour times
        order = np.argsort(ts, kind="stable")
        self.ev_user = ev_user[order].astype(np.int32)  # int32: 4 bytes a row less (U < 2^31)
        # int32 seconds since the start (4 bytes a row less; the period is < 2^23 s, TIME_BITS)
        self.ev_ts = (ts[order] - cfg.start_ts).astype(np.int32)
        del order, ev_user, ev_sess, gaps, cs, before
        days = np.unique(self.ev_ts // 86_400)
        if len(days) != cfg.days:  # cannot happen with rows >= 1000; guard the promise anyway
            raise RuntimeError(f"synthetic: generated {len(days)} days instead of {cfg.days}; "
                               "increase synthetic.rows")

    # -- behaviour streams (history), sorted by (user, time) ------------------------------------
    def _behaviours(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        U, C, L = cfg.num_users, cfg.categories, cfg.history_len
        active = self.n_u > 0
        pre = np.where(active, np.floor(L * np.sqrt(rng.random(U))).astype(np.int64), 0)
        during = np.where(active, rng.poisson(cfg.behaviours_per_event * self.n_u), 0)
        count = pre + during
        b_start = np.concatenate([[0], np.cumsum(count)])  # behaviours of user u: b_start[u]..
        b_user = np.repeat(np.arange(U), count)
        n_b = len(b_user)
        # times: pre-period ones uniformly in the 14 days before the start; in-period ones
        # 1..300 s before a uniformly chosen impression of the same user (active users only).
        is_pre = np.arange(n_b) - b_start[b_user] < pre[b_user]
        ev_pick = self.ev_start_u[b_user] + (rng.random(n_b) * self.n_u[b_user]).astype(np.int64)
        t_in = self.ts_by_user[ev_pick] - rng.integers(1, BEHAVIOUR_LEAD_S + 1, n_b)
        t_pre = cfg.start_ts - rng.integers(1, PRE_PERIOD_S + 1, n_b)
        b_ts = np.where(is_pre, t_pre, t_in)
        del is_pre, ev_pick, t_in, t_pre
        self.ts_by_user = None  # only the behaviour times needed it

        # categories ~ p_hist(c|u), sampled per block of users (U x C CDFs).
        sh = math.hypot(cfg.interest_profile_std, cfg.interest_history_std) or 1.0
        b_cat = np.empty(n_b, dtype=np.int64)
        b_aff = np.empty(n_b, dtype=np.float64)
        fav = np.empty((U, FAVOURITES), dtype=np.int64)
        log_pop = 0.5 * np.log(self.p_cat)
        for lo in range(0, U, USER_BLOCK):
            hi = min(U, lo + USER_BLOCK)
            aff = (self.hist_interest[lo:hi] / sh) @ self.phi.T  # a_uc
            logits = log_pop + 2.0 * aff
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            flat = (np.arange(hi - lo)[:, None] + _cdf(p)).ravel()
            starts = np.arange(hi - lo + 1) * C
            s0, s1 = b_start[lo], b_start[hi]
            local = b_user[s0:s1] - lo
            b_cat[s0:s1] = _draw_grouped(flat, local, rng, starts) - local * C
            b_aff[s0:s1] = aff[local, b_cat[s0:s1]]
            fav_users = np.repeat(np.arange(hi - lo), FAVOURITES)
            fav_cat = _draw_grouped(flat, fav_users, rng, starts) - fav_users * C
            fav[lo:hi] = self.brand_of(fav_cat, rng).reshape(hi - lo, FAVOURITES)
        self.favourites = fav
        b_brand = self.brand_of(b_cat, rng)
        on_fav = rng.random(n_b) < FAVOURITE_SHARE
        fav_brand = fav[b_user, rng.integers(0, FAVOURITES, n_b)]
        b_brand = np.where(on_fav, fav_brand, b_brand)
        del fav_brand
        b_cat = np.where(on_fav, self.brand_cat[b_brand], b_cat)
        non_pv = np.empty(n_b, dtype=bool)
        for s in range(0, n_b, SLICE_ROWS):
            sl = slice(s, s + SLICE_ROWS)
            fav_rows = np.flatnonzero(on_fav[sl]) + s
            b_aff[fav_rows] = np.einsum("nk,nk->n", self.hist_interest[b_user[fav_rows]] / sh,
                                        self.phi[b_cat[fav_rows]])
            non_pv[sl] = rng.random(len(b_aff[sl])) < _sigmoid(-2.5 + 0.8 * b_aff[sl] + 1.0 * on_fav[sl])
        del b_aff, on_fav
        kind_cdf = _cdf(np.array(NON_PV_SPLIT))
        b_btag = np.empty(n_b, dtype=np.int8)
        for s in range(0, n_b, SLICE_ROWS):
            sl = slice(s, s + SLICE_ROWS)
            b_btag[sl] = np.where(non_pv[sl], 2 + _draw(kind_cdf, rng, len(b_btag[sl])), 1)
        del non_pv

        order = timeline_order(b_user, b_ts)
        # Held for every behaviour: the narrowest integer type of each (widened per block).
        self.b_cat = (b_cat[order] + 1).astype(np.min_scalar_type(C))
        del b_cat
        self.b_brand = (b_brand[order] + 1).astype(np.min_scalar_type(cfg.brands))
        del b_brand
        self.b_btag = b_btag[order]  # int8
        b_user, b_ts = b_user[order], b_ts[order]
        del order, b_btag
        self.b_timeline = Timeline(b_user, b_ts)

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

    # -- one block of rows --------------------------------------------------------------------
    def block(self, b: int) -> pa.Table:
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(self.root + [4, b]))
        s, e = b * BLOCK_ROWS, min(cfg.rows, (b + 1) * BLOCK_ROWS)
        n = e - s
        users, ts = self.ev_user[s:e].astype(np.int64), self.ev_ts[s:e] + np.int64(cfg.start_ts)
        ads = _draw(self.ad_cdf, rng, n)
        pid = (rng.random(n) >= PID_PROBS[0]).astype(np.int64)
        p = _sigmoid(self.bias + self.logit_without_bias(users, ads, pid))
        label = (rng.random(n) < p).astype(np.int8)

        # behaviour history: the user's behaviours with t_b < t, newest history_len of them.
        start, end = self.b_timeline.bounds(users, ts, max_len=cfg.history_len)
        idx, offsets = gather(start, end)
        off = pa.array(offsets.astype(np.int32))

        def seq(values: np.ndarray) -> pa.Array:
            return pa.ListArray.from_arrays(off, pa.array(values))

        xd_start = users * cfg.cross_domain_len
        xd_idx, xd_off = gather(xd_start, xd_start + self.xd_len[users])
        xd_values = self.xd_seq.ravel()[xd_idx].astype(np.int32) + 1
        pid_arr = pa.DictionaryArray.from_arrays(pa.array(pid.astype(np.int8)),
                                                 pa.array(PID_VALUES)).dictionary_decode()
        return pa.table({
            "ts": pa.array(ts, pa.int64()),
            "label": pa.array(label),
            "user_id": pa.array(users + 1),
            "cms_segid": pa.array(self.segid[users]),
            "cms_group_id": pa.array(self.group[users]),
            "gender": pa.array(self.gender[users]),
            "age_level": pa.array(self.age[users]),
            "pvalue_level": _nullable(self.pvalue[users], self.pvalue_missing[users]),
            "shopping_level": pa.array(self.shopping[users]),
            "occupation": pa.array(self.occupation[users]),
            "new_user_class_level": _nullable(self.new_user[users], self.new_user_missing[users]),
            "adgroup_id": pa.array(ads + 1),
            "cate_id": pa.array(self.ad_cat[ads] + 1),
            "campaign_id": pa.array(self.ad_camp[ads] + 1),
            "customer": pa.array(self.ad_cust[ads] + 1),
            "brand": _nullable(self.ad_brand[ads] + 1, self.ad_brand_missing[ads]),
            "price": pa.array(self.ad_price[ads]),
            "pid": pid_arr,
            "hist_cate_id": seq(self.b_cat[idx].astype(np.int32)),
            "hist_brand": seq(self.b_brand[idx].astype(np.int32)),
            "hist_btag": seq(self.b_btag[idx].astype(np.int32)),
            "xd_content_cate": pa.ListArray.from_arrays(pa.array(xd_off.astype(np.int32)), pa.array(xd_values)),
            "xd_views_7d": pa.array(self.views[users]),
            "xd_likes_7d": pa.array(self.likes[users]),
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
        """The generated users/ads/behaviours (built once, on first use)."""
        if self._world is None:
            self._world = _World(self.cfg, self.seed)
        return self._world

    def chunks(self) -> Iterator[pa.Table]:
        world = self.world()
        self._world = None  # held by this generator only: freed once the rows are out
        pending: list[pa.Table] = []
        buffered = 0
        for b in range(-(-self.cfg.rows // BLOCK_ROWS)):
            pending.append(world.block(b))
            buffered += pending[-1].num_rows
            while buffered >= self.chunk_rows:
                merged = pa.concat_tables(pending)
                yield merged.slice(0, self.chunk_rows)
                rest = merged.slice(self.chunk_rows)
                pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
        if buffered:
            yield pa.concat_tables(pending)
