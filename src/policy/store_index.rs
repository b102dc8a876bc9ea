//! Names of grants and identities by the fields that lookups ask about, so
//! that a change or a resolution touches only the objects it concerns instead
//! of scanning the whole store (at 5,000 grants the scans were most of the
//! controller's CPU).
//!
//! The watch streams keep it in step with the reflector stores; readers take
//! names from here and objects from the store, so a name whose object is
//! already gone from the store is simply skipped.

use std::collections::{BTreeSet, HashMap};

/// (namespace, value): everything here is namespaced.
type Key = (String, String);

#[derive(Debug, Default)]
pub struct StoreIndex {
    grants_by_agent: HashMap<Key, BTreeSet<String>>,
    grants_by_secret: HashMap<Key, BTreeSet<String>>,
    /// (namespace, grant) → (agent, secret), to unindex without the object.
    grant_fields: HashMap<Key, (String, String)>,
    identities_by_account: HashMap<Key, BTreeSet<String>>,
    /// (namespace, identity) → ServiceAccount.
    identity_account: HashMap<Key, String>,
}

fn key(namespace: &str, value: &str) -> Key {
    (namespace.to_owned(), value.to_owned())
}

fn insert(map: &mut HashMap<Key, BTreeSet<String>>, at: Key, name: &str) {
    map.entry(at).or_default().insert(name.to_owned());
}

fn remove(map: &mut HashMap<Key, BTreeSet<String>>, at: &Key, name: &str) {
    if let Some(names) = map.get_mut(at) {
        names.remove(name);
        if names.is_empty() {
            map.remove(at);
        }
    }
}

fn names(map: &HashMap<Key, BTreeSet<String>>, namespace: &str, value: &str) -> Vec<String> {
    map.get(&key(namespace, value))
        .map(|names| names.iter().cloned().collect())
        .unwrap_or_default()
}

impl StoreIndex {
    /// Records grant `name` (created or updated) with its agent and Secret.
    pub fn apply_grant(&mut self, namespace: &str, name: &str, agent: &str, secret: &str) {
        let at = key(namespace, name);
        if self
            .grant_fields
            .get(&at)
            .map(|(a, s)| (a.as_str(), s.as_str()))
            == Some((agent, secret))
        {
            return;
        }
        self.delete_grant(namespace, name);
        insert(&mut self.grants_by_agent, key(namespace, agent), name);
        insert(&mut self.grants_by_secret, key(namespace, secret), name);
        self.grant_fields
            .insert(at, (agent.to_owned(), secret.to_owned()));
    }

    pub fn delete_grant(&mut self, namespace: &str, name: &str) {
        if let Some((agent, secret)) = self.grant_fields.remove(&key(namespace, name)) {
            remove(&mut self.grants_by_agent, &key(namespace, &agent), name);
            remove(&mut self.grants_by_secret, &key(namespace, &secret), name);
        }
    }

    /// Records identity `name` (created or updated) with its ServiceAccount.
    pub fn apply_identity(&mut self, namespace: &str, name: &str, service_account: &str) {
        let at = key(namespace, name);
        if self.identity_account.get(&at).map(String::as_str) == Some(service_account) {
            return;
        }
        self.delete_identity(namespace, name);
        insert(
            &mut self.identities_by_account,
            key(namespace, service_account),
            name,
        );
        self.identity_account.insert(at, service_account.to_owned());
    }

    pub fn delete_identity(&mut self, namespace: &str, name: &str) {
        if let Some(account) = self.identity_account.remove(&key(namespace, name)) {
            remove(
                &mut self.identities_by_account,
                &key(namespace, &account),
                name,
            );
        }
    }

    /// Forgets every grant, before re-adding the ones a relist returned.
    pub fn clear_grants(&mut self) {
        self.grants_by_agent.clear();
        self.grants_by_secret.clear();
        self.grant_fields.clear();
    }

    /// Forgets every identity, before re-adding the ones a relist returned.
    pub fn clear_identities(&mut self) {
        self.identities_by_account.clear();
        self.identity_account.clear();
    }

    /// Grants of `agent` in `namespace`, by name.
    pub fn grants_of_agent(&self, namespace: &str, agent: &str) -> Vec<String> {
        names(&self.grants_by_agent, namespace, agent)
    }

    /// Grants that read Secret `secret` in `namespace`, by name.
    pub fn grants_for_secret(&self, namespace: &str, secret: &str) -> Vec<String> {
        names(&self.grants_by_secret, namespace, secret)
    }

    /// Identities in `namespace` that claim `service_account`, by name.
    pub fn identities_claiming(&self, namespace: &str, service_account: &str) -> Vec<String> {
        names(&self.identities_by_account, namespace, service_account)
    }

    /// Number of indexed grants and identities.
    pub fn len(&self) -> (usize, usize) {
        (self.grant_fields.len(), self.identity_account.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_lookups_follow_updates_and_deletes_within_a_namespace() {
        let mut index = StoreIndex::default();
        index.apply_grant("a", "g1", "bot", "s");
        index.apply_grant("a", "g2", "bot", "t");
        index.apply_grant("b", "g1", "bot", "s");
        assert_eq!(index.grants_of_agent("a", "bot"), ["g1", "g2"]);
        assert_eq!(index.grants_for_secret("a", "s"), ["g1"]);
        assert_eq!(index.grants_for_secret("b", "s"), ["g1"]);
        assert!(index.grants_for_secret("c", "s").is_empty());

        // An update that moves g1 to another Secret (a replaced object).
        index.apply_grant("a", "g1", "bot", "t");
        assert!(index.grants_for_secret("a", "s").is_empty());
        assert_eq!(index.grants_for_secret("a", "t"), ["g1", "g2"]);
        // The same fields again change nothing.
        index.apply_grant("a", "g1", "bot", "t");
        assert_eq!(index.len(), (3, 0));

        index.delete_grant("a", "g1");
        index.delete_grant("a", "missing");
        assert_eq!(index.grants_of_agent("a", "bot"), ["g2"]);
        assert_eq!(index.grants_for_secret("a", "t"), ["g2"]);
        assert_eq!(index.grants_of_agent("b", "bot"), ["g1"]);
        index.clear_grants();
        assert_eq!(index.len(), (0, 0));
        assert!(index.grants_of_agent("b", "bot").is_empty());
    }

    #[test]
    fn identity_lookups_follow_service_account_changes() {
        let mut index = StoreIndex::default();
        index.apply_identity("a", "one", "sa");
        index.apply_identity("a", "two", "sa");
        index.apply_identity("b", "three", "sa");
        assert_eq!(index.identities_claiming("a", "sa"), ["one", "two"]);
        index.apply_identity("a", "two", "other");
        assert_eq!(index.identities_claiming("a", "sa"), ["one"]);
        assert_eq!(index.identities_claiming("a", "other"), ["two"]);
        index.delete_identity("a", "one");
        assert!(index.identities_claiming("a", "sa").is_empty());
        assert_eq!(index.identities_claiming("b", "sa"), ["three"]);
        index.clear_identities();
        assert_eq!(index.len(), (0, 0));
    }
}
