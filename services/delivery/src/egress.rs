//! Egress sources and pools: which local address a message leaves from. A pool is a
//! weighted set of sources; the choice skips sources suspended for the site or provider and
//! warming sources at today's cap, and moves traffic away from sources with a bad record.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use herald_core::config::DeliveryConfig;
use rand::Rng;
use tracing::{debug, warn};

use crate::{
    shaping::{SharedState, token},
    site::Site,
};

/// A local address mail leaves from.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    /// `None`: the address the OS picks.
    pub addr: Option<IpAddr>,
    pub ehlo: String,
    pub warmup: bool,
    /// KV-safe identity.
    pub key: String,
}

impl Source {
    /// The address for logs and events.
    pub fn ip_label(&self) -> String {
        self.addr.map(|a| a.to_string()).unwrap_or_default()
    }

    /// An IPv4 source cannot talk to an IPv6 host and the other way round; the implicit
    /// source lets the OS decide.
    pub fn reaches(&self, remote: &IpAddr) -> bool {
        self.addr.is_none_or(|a| a.is_ipv4() == remote.is_ipv4())
    }
}

/// Why no source may take a message now.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    /// suspended | connections | rate | warmup | no_source (a metric label).
    pub kind: &'static str,
    /// Unix ms when trying again makes sense.
    pub until_ms: i64,
    pub reason: String,
}

#[derive(Debug)]
pub struct Egress {
    sources: Vec<Arc<Source>>,
    pools: BTreeMap<String, Vec<(Arc<Source>, f64)>>,
    default_pool: String,
}

impl Egress {
    pub fn new(config: &DeliveryConfig) -> Egress {
        let sources: Vec<Arc<Source>> = if config.sources.is_empty() {
            vec![Arc::new(Source {
                name: "default".into(),
                addr: None,
                ehlo: config.hostname.clone(),
                warmup: false,
                key: "default".into(),
            })]
        } else {
            config
                .sources
                .iter()
                .map(|s| {
                    Arc::new(Source {
                        name: s.name.clone(),
                        addr: Some(s.address),
                        ehlo: s.ehlo.clone().unwrap_or_else(|| config.hostname.clone()),
                        warmup: s.warmup,
                        key: token(&s.address.to_string()),
                    })
                })
                .collect()
        };
        let pools = config
            .pools
            .iter()
            .map(|(name, members)| {
                let members = members
                    .iter()
                    .filter_map(|m| {
                        sources
                            .iter()
                            .find(|s| s.name == m.source)
                            .map(|s| (s.clone(), m.weight))
                    })
                    .collect();
                (name.clone(), members)
            })
            .collect();
        Egress {
            sources,
            pools,
            default_pool: config.default_pool.clone(),
        }
    }

    /// The members of `pool` (the default pool when `None` or unknown).
    pub fn members(&self, pool: Option<&str>) -> Vec<(Arc<Source>, f64)> {
        let named = pool.filter(|p| !p.is_empty());
        if let Some(p) = named {
            if let Some(m) = self.pools.get(p) {
                return m.clone();
            }
            warn!(pool = p, "unknown egress pool; using the default pool");
        }
        if let Some(m) = self.pools.get(&self.default_pool) {
            return m.clone();
        }
        self.sources.iter().map(|s| (s.clone(), 1.0)).collect()
    }
}

/// Orders candidates for one message: weighted random (a source with twice the weight comes
/// first twice as often), sources with weight 0 or a bad record last, as standby.
pub fn order(candidates: Vec<(Arc<Source>, f64, bool)>) -> Vec<Arc<Source>> {
    let mut rng = rand::rng();
    let mut keyed: Vec<(bool, f64, Arc<Source>)> = candidates
        .into_iter()
        .map(|(s, w, bad)| {
            // Efraimidis–Spirakis: u^(1/w) sorts a weighted random permutation.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            let k = if w > 0.0 { u.powf(1.0 / w) } else { 0.0 };
            (bad || w <= 0.0, k, s)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    keyed.into_iter().map(|(_, _, s)| s).collect()
}

/// A source for a message to `site`, in preference order, skipping sources suspended there
/// and warming sources at today's cap. Returns the ordered list of usable sources, or why
/// none is usable and until when.
pub async fn usable(
    state: &SharedState,
    members: Vec<(Arc<Source>, f64)>,
    site: &Site,
    schedule: &[u64],
    floor: f64,
    min_samples: u64,
) -> Result<Vec<Arc<Source>>, Unavailable> {
    let mut scored = Vec::with_capacity(members.len());
    for (s, w) in members {
        let rec = state.reputation(&s.key, &site.provider).await;
        let bad = rec.samples() >= min_samples as f64 && rec.score() < floor;
        scored.push((s, w, bad));
    }
    // A bad record only demotes a source while another one is in good standing.
    if scored.iter().all(|(_, _, bad)| *bad) {
        for s in scored.iter_mut() {
            s.2 = false;
        }
    }
    let mut out = Vec::new();
    let mut earliest: Option<Unavailable> = None;
    let mut note = |u: Unavailable| {
        if earliest.as_ref().is_none_or(|e| u.until_ms < e.until_ms) {
            earliest = Some(u);
        }
    };
    for s in order(scored) {
        match state.suspension(&s.key, &site.key, &site.provider).await {
            Ok(Some(susp)) => {
                debug!(source = %s.name, site = %site.label, until_ms = susp.until_ms, "source suspended for site");
                note(Unavailable {
                    kind: "suspended",
                    until_ms: susp.until_ms,
                    reason: format!(
                        "source {} suspended for {} by rule {} after \"{}\"",
                        s.name, site.label, susp.rule, susp.reply
                    ),
                });
                continue;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "suspension state unavailable; trying the source"),
        }
        if s.warmup {
            match state.warmup_cap(&s.key, schedule).await {
                Ok(Some(cap)) => match state.warmup_sent(&s.key, &site.provider).await {
                    Ok(sent) if sent >= cap => {
                        let tomorrow =
                            (crate::shaping::now_ms().div_euclid(86_400_000) + 1) * 86_400_000;
                        note(Unavailable {
                            kind: "warmup",
                            until_ms: tomorrow,
                            reason: format!(
                                "source {} reached today's warm-up cap of {cap} for {}",
                                s.name, site.label
                            ),
                        });
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "warm-up count unavailable"),
                },
                Ok(None) => {}
                Err(e) => warn!(error = %e, "warm-up state unavailable"),
            }
        }
        out.push(s);
    }
    if out.is_empty() {
        return Err(earliest.unwrap_or(Unavailable {
            kind: "no_source",
            until_ms: crate::shaping::now_ms() + 60_000,
            reason: "the egress pool has no source".into(),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str) -> Arc<Source> {
        Arc::new(Source {
            name: name.into(),
            addr: None,
            ehlo: "h".into(),
            warmup: false,
            key: name.into(),
        })
    }

    #[test]
    fn weights_set_how_often_a_source_comes_first() {
        let (a, b) = (source("a"), source("b"));
        let mut first_a = 0;
        for _ in 0..4000 {
            let o = order(vec![(a.clone(), 3.0, false), (b.clone(), 1.0, false)]);
            if o[0].name == "a" {
                first_a += 1;
            }
        }
        // Expected 3000 of 4000.
        assert!((2800..3200).contains(&first_a), "{first_a}");
    }

    #[test]
    fn standby_and_bad_sources_come_last() {
        let (a, b, c) = (source("a"), source("b"), source("c"));
        for _ in 0..100 {
            let o = order(vec![
                (a.clone(), 0.0, false),
                (b.clone(), 5.0, true),
                (c.clone(), 1.0, false),
            ]);
            assert_eq!(o[0].name, "c");
        }
    }

    #[test]
    fn sources_reach_hosts_of_their_own_family() {
        let v4 = Source {
            addr: Some("192.0.2.1".parse().expect("ip")),
            ..(*source("a")).clone()
        };
        let v6 = Source {
            addr: Some("2001:db8::1".parse().expect("ip")),
            ..(*source("b")).clone()
        };
        let mx4: IpAddr = "198.51.100.7".parse().expect("ip");
        let mx6: IpAddr = "2001:db8::25".parse().expect("ip");
        assert!(v4.reaches(&mx4) && !v4.reaches(&mx6));
        assert!(v6.reaches(&mx6) && !v6.reaches(&mx4));
        assert!(source("os").reaches(&mx4) && source("os").reaches(&mx6));
    }

    #[test]
    fn pools_default_to_every_source() {
        let config: DeliveryConfig = serde_yaml::from_str(
            "sources: [{name: a, address: 127.0.0.2}, {name: b, address: 127.0.0.3, ehlo: b.test}]\n\
             pools: {warm: [{source: b, weight: 2}]}",
        )
        .expect("yaml");
        let e = Egress::new(&config);
        assert_eq!(e.members(None).len(), 2);
        let warm = e.members(Some("warm"));
        assert_eq!(warm.len(), 1);
        assert_eq!(warm[0].0.ehlo, "b.test");
        assert_eq!(warm[0].1, 2.0);
        assert_eq!(e.members(Some("nope")).len(), 2);
    }
}
