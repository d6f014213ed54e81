//! Sites: the unit throttles apply to. A site is the set of MX hosts a destination resolves
//! to, so domains hosted by the same servers share one (gmail.com and googlemail.com); a
//! provider rule matched by MX host suffix makes all of a provider's hosts one site with the
//! provider's limits.

use herald_core::egress::{ProviderConfig, ShapingConfig, SiteLimits};

use crate::shaping::token;

/// Limits in force for a site, every field resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_rate: Option<f64>,
    pub max_messages_per_connection: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// KV-safe identity.
    pub key: String,
    /// For logs and events.
    pub label: String,
    /// Reputation and warm-up are counted per provider: a provider rule's name, else the
    /// site itself.
    pub provider: String,
    pub limits: Limits,
}

fn matches_suffix(host: &str, suffix: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let suffix = suffix
        .trim_start_matches('.')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    host == suffix || host.ends_with(&format!(".{suffix}"))
}

fn resolve(limits: &SiteLimits, default: &SiteLimits) -> Limits {
    Limits {
        max_connections: limits
            .max_connections
            .or(default.max_connections)
            .unwrap_or(32)
            .max(1),
        max_rate: limits.max_rate.or(default.max_rate),
        max_messages_per_connection: limits
            .max_messages_per_connection
            .or(default.max_messages_per_connection)
            .unwrap_or(100)
            .max(1),
    }
}

impl Site {
    /// The site of a destination whose MX hosts are `hosts`.
    pub fn of(hosts: &[String], shaping: &ShapingConfig) -> Site {
        let provider: Option<&ProviderConfig> = shaping.providers.iter().find(|p| {
            hosts
                .iter()
                .any(|h| p.mx_suffixes.iter().any(|s| matches_suffix(h, s)))
        });
        if let Some(p) = provider {
            let key = format!("p-{}", token(&p.name));
            return Site {
                label: p.name.clone(),
                provider: key.clone(),
                key,
                limits: resolve(&p.limits, &shaping.default),
            };
        }
        let mut names: Vec<String> = hosts
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        let label = names.join(",");
        let key = token(&names.join("="));
        Site {
            provider: key.clone(),
            key,
            label,
            limits: resolve(&SiteLimits::default(), &shaping.default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaping() -> ShapingConfig {
        serde_yaml::from_str(
            "default: {max_connections: 4, max_messages_per_connection: 10}\n\
             providers: [{name: google, mx_suffixes: [google.com], max_rate: 5}]",
        )
        .expect("yaml")
    }

    #[test]
    fn the_same_mx_set_is_the_same_site_in_any_order() {
        let a = Site::of(
            &["mx2.example.test.".into(), "MX1.example.test".into()],
            &shaping(),
        );
        let b = Site::of(
            &["mx1.example.test".into(), "mx2.example.test".into()],
            &shaping(),
        );
        assert_eq!(a, b);
        assert_eq!(a.label, "mx1.example.test,mx2.example.test");
        assert_eq!(a.limits.max_connections, 4);
        assert_eq!(a.limits.max_rate, None);
    }

    #[test]
    fn provider_hosts_share_one_site_with_its_limits() {
        let gmail = Site::of(&["gmail-smtp-in.l.google.com".into()], &shaping());
        let other = Site::of(&["alt1.aspmx.l.google.com".into()], &shaping());
        assert_eq!(gmail.key, other.key);
        assert_eq!(gmail.label, "google");
        assert_eq!(gmail.limits.max_rate, Some(5.0));
        assert_eq!(gmail.limits.max_connections, 4);
        // A label boundary is required: notgoogle.com is not Google.
        let fake = Site::of(&["mx.notgoogle.com".into()], &shaping());
        assert_ne!(fake.key, gmail.key);
    }
}
