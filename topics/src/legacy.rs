//! The legacy names, both ways: `TypeCommande.*` / `TypeEvenement.*` of the MVP's Python code and the
//! lowercase strings of its JSON protocol (`"commande": "liste_disques"`), mapped to the topic roots.

use crate::topic::{Command, Notification};

/// One row per legacy command: (command, `TypeCommande` name, `commande` string, response kind).
///
/// The response kinds are the MVP's `payload.commande` values in a `reponse`; where the MVP had no
/// distinct kind, the command's own string is used.
const COMMANDS: [(Command, &str, &str, &str); 9] = [
    (
        Command::ListDisks,
        "LISTE_DISQUES",
        "liste_disques",
        "liste_disques",
    ),
    (
        Command::ListFiles,
        "LISTE_FICHIERS",
        "liste_fichiers",
        "liste_fichiers",
    ),
    (
        Command::ReadFile,
        "LIT_FICHIER",
        "lit_fichier",
        "lit_fichier",
    ),
    (
        Command::CopyFile,
        "COPIE_FICHIER",
        "copie_fichier",
        "copie_fichier",
    ),
    (
        Command::RemoveFile,
        "SUPPRIME_FICHIER",
        "supprime_fichier",
        "supprime_fichier",
    ),
    (
        Command::Benchmark,
        "START_BENCHMARK",
        "start_benchmark",
        "benchmark_files",
    ),
    (
        Command::GetFileFootprint,
        "GET_FILE_FOOTPRINT",
        "get_file_footprint",
        "file_footprint",
    ),
    (
        Command::CreateFile,
        "CREATE_FILE",
        "create_file",
        "file_creation",
    ),
    (
        Command::Discover,
        "LISTE_COMPOSANTS",
        "liste_composants",
        "liste_composants",
    ),
];

/// One row per legacy event: (notification, `TypeEvenement` name, `evenement` string).
const EVENTS: [(Notification, &str, &str); 3] = [
    (Notification::NewFile, "FICHIER", "fichier"),
    (Notification::Error, "ERREUR", "erreur"),
    (Notification::Announce, "COMPOSANTS", "composants"),
];

/// `TypeCommande.LISTE_DISQUES` → `LISTE_DISQUES`. None for Dom0 extensions.
pub fn type_commande(command: Command) -> Option<&'static str> {
    COMMANDS.iter().find(|r| r.0 == command).map(|r| r.1)
}

/// Accepts `LISTE_DISQUES` or `TypeCommande.LISTE_DISQUES`.
pub fn from_type_commande(name: &str) -> Option<Command> {
    let name = name.strip_prefix("TypeCommande.").unwrap_or(name);
    COMMANDS.iter().find(|r| r.1 == name).map(|r| r.0)
}

/// The MVP protocol's `commande` string (`liste_disques`).
pub fn commande(command: Command) -> Option<&'static str> {
    COMMANDS.iter().find(|r| r.0 == command).map(|r| r.2)
}

pub fn from_commande(s: &str) -> Option<Command> {
    COMMANDS.iter().find(|r| r.2 == s).map(|r| r.0)
}

/// The MVP's response kind for a command (`file_footprint` for `get_file_footprint`).
pub fn response_kind(command: Command) -> Option<&'static str> {
    COMMANDS.iter().find(|r| r.0 == command).map(|r| r.3)
}

/// The command whose response kind is `kind` (`benchmark_inputs` is the MVP's second benchmark kind).
pub fn from_response_kind(kind: &str) -> Option<Command> {
    if kind == "benchmark_inputs" {
        return Some(Command::Benchmark);
    }
    COMMANDS.iter().find(|r| r.3 == kind).map(|r| r.0)
}

/// `TypeEvenement.FICHIER` → `FICHIER`.
pub fn type_evenement(n: Notification) -> Option<&'static str> {
    EVENTS.iter().find(|r| r.0 == n).map(|r| r.1)
}

/// Accepts `FICHIER` or `TypeEvenement.FICHIER`.
pub fn from_type_evenement(name: &str) -> Option<Notification> {
    let name = name.strip_prefix("TypeEvenement.").unwrap_or(name);
    EVENTS.iter().find(|r| r.1 == name).map(|r| r.0)
}

/// The MVP protocol's `evenement` string (`fichier`).
pub fn evenement(n: Notification) -> Option<&'static str> {
    EVENTS.iter().find(|r| r.0 == n).map(|r| r.2)
}

pub fn from_evenement(s: &str) -> Option<Notification> {
    EVENTS.iter().find(|r| r.2 == s).map(|r| r.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_table() {
        // DESIGN.md's table: legacy TypeCommande → topic root.
        let rows = [
            ("LISTE_DISQUES", "system/disks/list_disks"),
            ("LISTE_FICHIERS", "system/disks/list_files"),
            ("LIT_FICHIER", "system/disks/read_file"),
            ("COPIE_FICHIER", "system/disks/copy_file"),
            ("SUPPRIME_FICHIER", "system/disks/remove_file"),
            ("START_BENCHMARK", "system/misc/benchmark"),
            ("GET_FILE_FOOTPRINT", "system/disks/get_file_footprint"),
            ("CREATE_FILE", "system/disks/create_file"),
            ("LISTE_COMPOSANTS", "system/components/discover"),
        ];
        for (name, root) in rows {
            let c = from_type_commande(name).unwrap();
            assert_eq!(c.root(), root);
            assert_eq!(from_type_commande(&format!("TypeCommande.{name}")), Some(c));
            assert_eq!(type_commande(c), Some(name));
            let lower = name.to_lowercase();
            assert_eq!(commande(c), Some(lower.as_str()));
            assert_eq!(from_commande(&lower), Some(c));
            let kind = response_kind(c).unwrap();
            assert_eq!(from_response_kind(kind), Some(c));
        }
        assert_eq!(
            from_type_evenement("TypeEvenement.FICHIER").unwrap().root(),
            "system/disk/new_file"
        );
        assert_eq!(
            from_type_evenement("ERREUR").unwrap().root(),
            "system/events/error"
        );
        for n in [Notification::NewFile, Notification::Error] {
            assert_eq!(from_evenement(evenement(n).unwrap()), Some(n));
            assert_eq!(from_type_evenement(type_evenement(n).unwrap()), Some(n));
        }
    }

    #[test]
    fn mvp_response_kinds() {
        assert_eq!(
            response_kind(Command::GetFileFootprint),
            Some("file_footprint")
        );
        assert_eq!(response_kind(Command::CreateFile), Some("file_creation"));
        assert_eq!(
            from_response_kind("benchmark_inputs"),
            Some(Command::Benchmark)
        );
        assert_eq!(type_commande(Command::SupervisionCounters), None);
        assert_eq!(from_commande("formate_disque"), None);
        assert_eq!(from_type_commande("TypeCommande."), None);
    }
}
