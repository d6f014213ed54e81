//! Traffic-shaping rules: what a remote reply teaches delivery. A rule matches replies by
//! code, enhanced status code and a regular expression on the text; counted per (source,
//! site) in shared state, it fires once its threshold is met within its window.

use std::time::Duration;

use herald_core::egress::{ReplyRule, RuleAction};
use regex::Regex;
use tracing::warn;

use crate::{client::RemoteReply, shaping::SharedState};

struct Rule {
    config: ReplyRule,
    text: Option<Regex>,
}

impl Rule {
    fn matches(&self, reply: &RemoteReply) -> bool {
        if reply.is_positive() {
            return false;
        }
        self.config.code.is_none_or(|c| c == reply.code)
            && self
                .config
                .enhanced
                .as_deref()
                .is_none_or(|e| reply.enhanced.starts_with(e))
            && self.text.as_ref().is_none_or(|t| t.is_match(&reply.text))
    }
}

/// A rule that fired: what to do, and the reply that made it fire.
#[derive(Debug, Clone)]
pub struct Effect {
    pub rule: String,
    pub action: RuleAction,
    pub duration: Duration,
    pub reply: RemoteReply,
}

pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    pub fn compile(rules: &[ReplyRule]) -> Result<Rules, String> {
        let rules = rules
            .iter()
            .map(|r| {
                let text = r
                    .text
                    .as_deref()
                    .map(Regex::new)
                    .transpose()
                    .map_err(|e| format!("shaping rule {}: {e}", r.name))?;
                Ok(Rule {
                    config: r.clone(),
                    text,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Rules { rules })
    }

    /// A `bounce` rule matches: the temporary reply is final.
    pub fn bounces(&self, reply: &RemoteReply) -> bool {
        self.rules
            .iter()
            .any(|r| r.config.action == RuleAction::Bounce && r.matches(reply))
    }

    /// Counts every rule (except `bounce`, which acts on each reply directly) that some of
    /// `replies` match, once, and returns those that reach their threshold.
    pub async fn fire(
        &self,
        state: &SharedState,
        source: &str,
        site: &str,
        replies: &[RemoteReply],
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        for rule in &self.rules {
            if rule.config.action == RuleAction::Bounce {
                continue;
            }
            let Some(reply) = replies.iter().find(|r| rule.matches(r)) else {
                continue;
            };
            let c = &rule.config;
            match state
                .hit(source, site, &c.name, c.threshold, c.window)
                .await
            {
                Ok(true) => effects.push(Effect {
                    rule: c.name.clone(),
                    action: c.action,
                    duration: c.duration,
                    reply: reply.clone(),
                }),
                Ok(false) => {}
                Err(e) => warn!(error = %e, rule = %c.name, "rule hit not counted"),
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: &str, text: &str) -> RemoteReply {
        RemoteReply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }

    #[test]
    fn every_given_field_must_match() {
        let rules = Rules::compile(
            &serde_yaml::from_str::<Vec<ReplyRule>>(
                "[{name: conn, code: 421, text: '(?i)too many connections', action: suspend},\n \
                 {name: spam, enhanced: '4.7.', text: 'unsolicited', action: bounce}]",
            )
            .expect("yaml"),
        )
        .expect("compile");
        let conn = &rules.rules[0];
        assert!(conn.matches(&reply(421, "4.7.0", "Too many connections, slow down")));
        assert!(!conn.matches(&reply(450, "4.7.0", "Too many connections")));
        assert!(!conn.matches(&reply(421, "4.3.2", "Service shutting down")));
        assert!(rules.bounces(&reply(421, "4.7.28", "unsolicited mail from your IP")));
        assert!(!rules.bounces(&reply(421, "4.4.2", "unsolicited")));
        assert!(!rules.bounces(&reply(250, "2.0.0", "unsolicited")));
    }

    #[test]
    fn a_bad_expression_is_refused() {
        let bad: Vec<ReplyRule> =
            serde_yaml::from_str("[{name: x, text: '(', action: suspend}]").expect("yaml");
        assert!(Rules::compile(&bad).is_err());
    }
}
