//! Pending changes of a container config: the `[pve:pending]` section and its `delete:`
//! list.
//!
//! ```text
//! [pve:pending]
//! delete: !mp0,swap
//! memory: 1024
//! ```
//!
//! Compatibility target: pve-guest-common `PVE::AbstractConfig` `parse_pending_delete`,
//! `print_pending_delete`, `add_to_pending_delete`, `remove_from_pending_delete` and
//! `cleanup_pending` (tested upstream by `src/tests/abstract-config-tests.pl`). The list is
//! split on `,`, `;` and whitespace; a leading `!` marks a forced deletion (only one `!`
//! is consumed, so `!!k` is the forced deletion of `!k`); it prints sorted and
//! comma-joined.

use std::collections::BTreeMap;

use super::pct_conf::CtConfig;
use super::propstring::perl_true;

/// Pending deletions: key → forced.
pub type PendingDelete = BTreeMap<String, bool>;

/// `parse_pending_delete`.
#[must_use]
pub fn parse_pending_delete(data: &str) -> PendingDelete {
    let mut res = PendingDelete::new();
    if !perl_true(data) {
        return res;
    }
    let replaced: String = data
        .chars()
        .map(|c| if c == ',' || c == ';' { ' ' } else { c })
        .collect();
    for entry in replaced.split(|c: char| c.is_ascii_whitespace() || c == '\x0b') {
        if entry.is_empty() {
            continue;
        }
        match entry.strip_prefix('!') {
            Some(key) => res.insert(key.to_string(), true),
            None => res.insert(entry.to_string(), false),
        };
    }
    res
}

/// `print_pending_delete`.
#[must_use]
pub fn print_pending_delete(deletions: &PendingDelete) -> String {
    deletions
        .iter()
        .map(|(k, force)| if *force { format!("!{k}") } else { k.clone() })
        .collect::<Vec<_>>()
        .join(",")
}

impl CtConfig {
    /// The parsed `delete:` list of the pending section.
    #[must_use]
    pub fn pending_delete(&self) -> PendingDelete {
        parse_pending_delete(self.pending.get("delete").unwrap_or(""))
    }

    fn store_pending_delete(&mut self, deletions: &PendingDelete) {
        if deletions.is_empty() {
            self.pending.options.remove("delete");
        } else {
            self.pending
                .options
                .insert("delete".to_string(), print_pending_delete(deletions));
        }
    }

    /// `add_to_pending_delete`: marks `key` for deletion (replacing its force flag).
    pub fn add_to_pending_delete(&mut self, key: &str, force: bool) {
        let mut d = self.pending_delete();
        d.insert(key.to_string(), force);
        self.store_pending_delete(&d);
    }

    /// `remove_from_pending_delete`: unmarks `key`; drops `delete:` when it becomes empty.
    pub fn remove_from_pending_delete(&mut self, key: &str) {
        let mut d = self.pending_delete();
        if d.remove(key).is_some() {
            self.store_pending_delete(&d);
        }
    }

    /// `cleanup_pending`: drops pending values equal to the current ones and pending
    /// deletions of keys the current config does not have. Returns whether anything
    /// changed.
    pub fn cleanup_pending(&mut self) -> bool {
        let mut changes = false;
        let same: Vec<String> = self
            .pending
            .options
            .iter()
            .filter(|(k, v)| *k != "delete" && self.main.options.get(*k) == Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in same {
            self.pending.options.remove(&k);
            changes = true;
        }
        if self.pending.description.is_some() && self.pending.description == self.main.description {
            self.pending.description = None;
            changes = true;
        }
        let current = self.pending_delete();
        let mut keep = PendingDelete::new();
        for (k, force) in current {
            let defined = match k.as_str() {
                "description" => self.main.description.is_some(),
                "env" => !self.main.env.is_empty(),
                _ => self.main.options.contains_key(&k),
            };
            if defined {
                keep.insert(k, force);
            } else {
                changes = true;
            }
        }
        self.store_pending_delete(&keep);
        changes
    }
}
