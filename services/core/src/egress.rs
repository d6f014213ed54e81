//! Delivery's egress configuration: the source addresses mail leaves from, the pools that
//! group them, the warm-up schedule of new addresses, and the traffic-shaping limits and
//! reply rules applied per (source, destination site).
//!
//! These are configuration types only; the delivery crate holds the state machines.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// One address mail leaves from, and the name it gives in EHLO (which should match the
/// address's reverse DNS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Referred to by pools.
    pub name: String,
    /// Local address bound before connecting.
    pub address: IpAddr,
    /// EHLO name; `delivery.hostname` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ehlo: Option<String>,
    /// A new address without sending history: its daily volume per mailbox provider follows
    /// `delivery.warmup.schedule`, counted from the first day it is used.
    #[serde(default)]
    pub warmup: bool,
}

/// A source's share of a pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub source: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Most messages per day and mailbox provider for a warming source: day 1, day 2, ...
    /// After the last day the source is warm and uncapped.
    pub schedule: Vec<u64>,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            schedule: vec![
                50, 100, 500, 1_000, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000,
            ],
        }
    }
}

/// Limits for one (source, site) pair; unset fields fall back to `shaping.default`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteLimits {
    /// Simultaneous connections from one source to the site, across all delivery pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages per second from one source to the site, across all delivery pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<f64>,
    /// Messages sent over one connection before it is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages_per_connection: Option<u32>,
}

/// A mailbox provider recognised by the names of its MX hosts. All its MX hosts form one
/// site (gmail.com and googlemail.com share Google's), with its own limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// An MX host whose name ends with one of these (at a label boundary) belongs to it.
    pub mx_suffixes: Vec<String>,
    #[serde(flatten)]
    pub limits: SiteLimits,
}

/// What a matching reply makes delivery do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// No new connection from this source to this site for `duration`.
    Suspend,
    /// No new connection from this source to any site of the provider for `duration`.
    SuspendProvider,
    /// Halve the (source, site) message rate; it recovers a little with every delivery.
    CutRate,
    /// Treat the (temporary) reply as permanent: the recipient bounces.
    Bounce,
}

/// A traffic-shaping rule: replies it matches (every given field must match), counted per
/// (source, site); the action fires when `threshold` matches fall within `window`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Enhanced status code or its prefix, e.g. `4.7.` or `5.7.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    /// Regular expression searched in the reply text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default = "one_u32")]
    pub threshold: u32,
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub window: Duration,
    pub action: RuleAction,
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub duration: Duration,
}

fn one_u32() -> u32 {
    1
}

fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingConfig {
    /// Limits of every site that no provider matches, and fallbacks for providers.
    pub default: SiteLimits,
    pub providers: Vec<ProviderConfig>,
    pub rules: Vec<ReplyRule>,
    /// An idle connection is kept this long for the next message to the same site.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest time an entry waits inside a worker for a connection or rate slot; beyond
    /// it the entry is re-queued for later and the worker moves on.
    #[serde(with = "humantime_serde")]
    pub hold_max: Duration,
    /// Longest pause of an entry sent back to the queue because its site is saturated
    /// (connections or rate); the pause doubles from 250 ms with each wait of the entry.
    #[serde(with = "humantime_serde")]
    pub wait_backoff_max: Duration,
    /// Life of a connection slot claimed by a pod that dies without giving it back.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Rate applied after a `cut_rate` rule to a site without `max_rate`.
    pub cut_rate_base: f64,
    /// Share of the full rate regained with each delivery after a cut.
    pub rate_recovery_step: f64,
    /// Half-life of the delivery history a source's reputation is computed from.
    #[serde(with = "humantime_serde")]
    pub reputation_half_life: Duration,
    /// A source whose score (0..1) falls below this gets no traffic for the provider while
    /// another source of the pool scores better.
    pub reputation_floor: f64,
    /// Outcomes needed before a score counts.
    pub reputation_min_samples: u64,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        let rule =
            |name: &str, code, enhanced: Option<&str>, text: &str, threshold, action, mins: u64| {
                ReplyRule {
                    name: name.into(),
                    code,
                    enhanced: enhanced.map(String::from),
                    text: Some(text.into()),
                    threshold,
                    window: ten_minutes(),
                    action,
                    duration: Duration::from_secs(60 * mins),
                }
            };
        ShapingConfig {
            default: SiteLimits {
                max_connections: Some(32),
                max_rate: None,
                max_messages_per_connection: Some(100),
            },
            providers: Vec::new(),
            rules: vec![
                rule(
                    "too-many-connections",
                    Some(421),
                    None,
                    "(?i)too many (connections|concurrent)|connection (limit|rate)",
                    3,
                    RuleAction::Suspend,
                    5,
                ),
                rule(
                    "rate-limited",
                    None,
                    Some("4.7."),
                    "(?i)rate|throttl|too many messages|try again later",
                    3,
                    RuleAction::CutRate,
                    10,
                ),
                rule(
                    "blocklisted",
                    None,
                    Some("5.7."),
                    "(?i)block|blacklist|spamhaus|reputation|listed",
                    1,
                    RuleAction::SuspendProvider,
                    60,
                ),
            ],
            idle_timeout: Duration::from_secs(5),
            hold_max: Duration::from_secs(2),
            wait_backoff_max: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(600),
            cut_rate_base: 10.0,
            rate_recovery_step: 0.02,
            reputation_half_life: Duration::from_secs(6 * 3600),
            reputation_floor: 0.5,
            reputation_min_samples: 50,
        }
    }
}

/// Refuses pools naming unknown sources, duplicate names and unusable numbers, so that a
/// mistake shows at start-up rather than as mail that never leaves.
pub fn validate(
    sources: &[SourceConfig],
    pools: &BTreeMap<String, Vec<PoolMember>>,
    default_pool: &str,
    shaping: &ShapingConfig,
) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for s in sources {
        if !names.insert(s.name.as_str()) {
            return Err(format!("delivery.sources: {} is defined twice", s.name));
        }
    }
    for (pool, members) in pools {
        if members.is_empty() {
            return Err(format!("delivery.pools.{pool} has no source"));
        }
        for m in members {
            if !names.contains(m.source.as_str()) {
                return Err(format!(
                    "delivery.pools.{pool}: no source named {}",
                    m.source
                ));
            }
            if !(m.weight.is_finite() && m.weight >= 0.0) {
                return Err(format!(
                    "delivery.pools.{pool}: weight of {} must be ≥ 0",
                    m.source
                ));
            }
        }
    }
    if !default_pool.is_empty() && !pools.contains_key(default_pool) {
        return Err(format!(
            "delivery.default_pool: no pool named {default_pool}"
        ));
    }
    for r in &shaping.rules {
        if let Some(t) = &r.text {
            check_regex(t).map_err(|e| format!("shaping rule {}: {e}", r.name))?;
        }
        if r.threshold == 0 {
            return Err(format!("shaping rule {}: threshold must be ≥ 1", r.name));
        }
    }
    let limits =
        std::iter::once(&shaping.default).chain(shaping.providers.iter().map(|p| &p.limits));
    for l in limits {
        if l.max_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err("shaping: max_rate must be a positive number".into());
        }
        if l.max_connections == Some(0) || l.max_messages_per_connection == Some(0) {
            return Err("shaping: limits must be ≥ 1".into());
        }
    }
    Ok(())
}

fn check_regex(pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Egress {
        #[serde(default)]
        sources: Vec<SourceConfig>,
        #[serde(default)]
        pools: BTreeMap<String, Vec<PoolMember>>,
        #[serde(default)]
        shaping: ShapingConfig,
    }

    fn check(e: &Egress) -> Result<(), String> {
        validate(&e.sources, &e.pools, "", &e.shaping)
    }

    #[test]
    fn a_pool_must_name_known_sources() {
        let c: Egress = serde_yaml::from_str(
            "sources: [{name: a, address: 127.0.0.2, warmup: true}]\n\
             pools: {main: [{source: a, weight: 2}, {source: b}]}",
        )
        .expect("yaml");
        assert!(c.sources[0].warmup);
        assert_eq!(c.pools["main"][1].weight, 1.0);
        assert!(check(&c).unwrap_err().contains("no source named b"));
    }

    #[test]
    fn rules_and_providers_read_from_yaml() {
        let c: Egress = serde_yaml::from_str(
            "shaping:\n  providers: [{name: google, mx_suffixes: [google.com], max_rate: 5}]\n  \
             rules: [{name: r, code: 421, text: '(?i)busy', threshold: 3, window: 1m, \
             action: suspend, duration: 30s}]",
        )
        .expect("yaml");
        check(&c).expect("valid");
        assert_eq!(c.shaping.providers[0].limits.max_rate, Some(5.0));
        assert_eq!(c.shaping.rules[0].action, RuleAction::Suspend);
        assert_eq!(c.shaping.rules[0].duration, Duration::from_secs(30));
        let bad: Egress =
            serde_yaml::from_str("shaping: {rules: [{name: r, text: '(', action: bounce}]}")
                .expect("yaml");
        assert!(check(&bad).is_err());
    }

    #[test]
    fn default_rules_are_valid() {
        validate(&[], &BTreeMap::new(), "", &ShapingConfig::default()).expect("defaults");
    }
}
