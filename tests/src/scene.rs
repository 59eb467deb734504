//! The system under test as the demo runs it: Dom0 (with its broker), sys-usb's agent serving two
//! disks and a repository, vm-gui's agent, each guest on its simulated channel.

use std::path::PathBuf;

use crate::channel::Channel;
use crate::{Agent, BrokerKind, Dom0, TestDir};

/// The default roles, with application topics opened: every VM may read `subscribe` and publish
/// on `publish` (`{vm}`: the publisher's own name).
pub fn policy_opening(subscribe: &str, publish: &str) -> String {
    format!(
        "[vm.\"*\"]\nroles = [\"agent\"]\nsubscribe = [\"{subscribe}\"]\npublish = [\"{publish}\"]\n\n\
         [vm.vm-gui]\nroles = [\"client\"]\n\n[vm.sys-usb]\nroles = [\"disk-provider\"]\n"
    )
}

/// The default policy, with these VMs (guests without the agent, old guests) asking like vm-gui.
pub fn policy_with_clients(vms: &[&str]) -> String {
    let mut p = dom0_broker::policy::DEFAULT_POLICY.to_owned();
    for vm in vms {
        p.push_str(&format!("\n[vm.{vm}]\nroles = [\"client\"]\n"));
    }
    p
}

/// What a scene changes from the default one.
#[derive(Debug, Default, Clone, Copy)]
pub struct SceneOptions<'a> {
    /// The policy file's text (None: dom0-broker's built-in default policy).
    pub policy: Option<&'a str>,
    /// vm-gui's agent config file (its flags come first).
    pub gui_config: &'a str,
    /// sys-usb's agent config file (its flags come first).
    pub usb_config: &'a str,
}

/// Dom0, sys-usb and vm-gui, all up.
#[derive(Debug)]
pub struct Scene {
    pub kind: BrokerKind,
    pub dom0: Dom0,
    pub usb_ch: Channel,
    pub gui_ch: Channel,
    pub usb: Agent,
    pub gui: Agent,
    /// sys-usb's disks: `usb0` (with `docs/report.txt`) and `usb1`.
    pub disks: PathBuf,
    /// sys-usb's local repository.
    pub repo: PathBuf,
    /// The policy file, when the scene has one.
    pub policy: Option<PathBuf>,
    /// dom0-broker's extra flags, to restart it the same way.
    pub dom0_args: Vec<String>,
    /// Last: dropped after the processes, so that a failing test still shows their logs.
    pub dir: TestDir,
}

impl Scene {
    /// Starts everything and waits until both guests have their session.
    pub fn start(name: &str, kind: BrokerKind, opts: SceneOptions<'_>) -> Scene {
        let dir = TestDir::new(name);
        let disks = dir.join("disks");
        let repo = dir.join("repository");
        std::fs::create_dir_all(disks.join("usb0/docs")).unwrap();
        std::fs::create_dir_all(disks.join("usb1")).unwrap();
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(disks.join("usb0/docs/report.txt"), b"quarterly report\n").unwrap();
        let mut dom0_args = Vec::new();
        let policy = opts.policy.map(|text| {
            let file = dir.join("policy.toml");
            std::fs::write(&file, text).unwrap();
            dom0_args = vec!["--policy".to_owned(), file.display().to_string()];
            file
        });
        let args: Vec<&str> = dom0_args.iter().map(String::as_str).collect();
        let dom0 = Dom0::start(&dir, kind, &args);
        let usb_ch = Channel::new(&dir.path, "sys-usb");
        let gui_ch = Channel::new(&dir.path, "vm-gui");
        dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
        dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
        let (d, r) = (disks.display().to_string(), repo.display().to_string());
        let usb_conf = dir.join("sys-usb.toml");
        std::fs::write(&usb_conf, opts.usb_config).unwrap();
        let u = usb_conf.display().to_string();
        let usb = Agent::start(
            &dir,
            &usb_ch,
            "sys-usb",
            &["--disks", &d, "--repository", &r, "--config", &u],
        );
        let gui_conf = dir.join("vm-gui.toml");
        std::fs::write(&gui_conf, opts.gui_config).unwrap();
        let g = gui_conf.display().to_string();
        let gui = Agent::start(&dir, &gui_ch, "vm-gui", &["--config", &g]);
        // Both agents have subscribed (their SUBSCRIBE follows the CONNACK on the same tty).
        dom0.proc.wait_log("link{vm=sys-usb}: session up");
        dom0.proc.wait_log("link{vm=vm-gui}: session up");
        Scene {
            dir,
            kind,
            dom0,
            usb_ch,
            gui_ch,
            usb,
            gui,
            disks,
            repo,
            policy,
            dom0_args,
        }
    }

    /// dom0-broker's extra flags, borrowed.
    pub fn dom0_args(&self) -> Vec<&str> {
        self.dom0_args.iter().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dom0_broker::policy::Policy;
    use topics::vm::VmId;

    #[test]
    fn the_policy_fixtures_are_valid_policies() {
        let opened = Policy::parse(&policy_opening("app/#", "app/{vm}/#"), "opening").unwrap();
        let gui = opened.rules_for(&VmId::parse("vm-gui").unwrap());
        assert!(gui.check_subscribe("app/#").is_ok());
        let extra = Policy::parse(&policy_with_clients(&["vm-old", "vm-bare"]), "clients").unwrap();
        assert!(extra.named_vms().any(|n| n == "vm-old"));
        assert!(extra.named_vms().any(|n| n == "vm-bare"));
    }
}
