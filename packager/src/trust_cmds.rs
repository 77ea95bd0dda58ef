//! The trust tools: `ferry root` (create, sign, verify roots of trust),
//! `ferry approve` (an approver's signature on a packed bundle) and
//! `ferry command` (operator commands signed offline, for an emergency
//! without the console). See `docs/security.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Args, Subcommand};
use ferry_format::{
    Envelope, ROOT_PAYLOAD_TYPE, ROOT_SCHEMA, RoleSpec, Root, RootDocument, add_signatures,
    parse_document, release_id_of, roles,
};
use ferry_protocol::{Action, Command, OperatorSignature, SCHEMA_VERSION};

use crate::keyfile::{read_public_keys, read_secret_key};
use crate::{exit, fail};

#[derive(Subcommand)]
pub enum RootCommand {
    /// Write a root of trust: the keys and thresholds of each role. Sign it
    /// with `--key` here or later with `ferry root sign`.
    Init(RootInitArgs),
    /// Add signatures to a root (each root key holder runs it with their key).
    Sign(RootSignArgs),
    /// Check a root: its own root threshold, and with `--previous` that it
    /// may follow that root (next version, signed by the old root threshold).
    Verify(RootVerifyArgs),
}

#[derive(Args)]
pub struct RootInitArgs {
    /// Public keys of the root role (who signs roots). Repeatable.
    #[arg(long = "root", value_name = "PUB", required = true)]
    root: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    root_threshold: usize,
    /// Public keys of the builder role (CI's `ferry pack`). Repeatable.
    #[arg(long = "builder", value_name = "PUB", required = true)]
    builder: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    builder_threshold: usize,
    /// Public keys of the approver role (`ferry approve`): when given, a
    /// release needs builder *and* approver signatures. Repeatable.
    #[arg(long = "approver", value_name = "PUB")]
    approver: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    approver_threshold: usize,
    /// Public keys of the operator role (signed commands). Repeatable.
    #[arg(long = "operator", value_name = "PUB", required = true)]
    operator: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    operator_threshold: usize,
    /// Public keys of the channel role (signs channel metadata when
    /// publishing). Without it devices accept unsigned channel indexes.
    #[arg(long = "channel", value_name = "PUB")]
    channel: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    channel_threshold: usize,
    /// The root's version: 1 for a new root; the previous version + 1 for a
    /// rotation (then sign with the old and the new root keys).
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// Sign with these private keys right away. Repeatable.
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<PathBuf>,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RootSignArgs {
    /// The root file (signed in place unless --out).
    root: PathBuf,
    /// Private key(s) to sign with. Repeatable.
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    #[arg(short, long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct RootVerifyArgs {
    /// The root file.
    root: PathBuf,
    /// The root it must follow (a rotation).
    #[arg(long)]
    previous: Option<PathBuf>,
}

#[derive(Args)]
pub struct ApproveArgs {
    /// The packed bundle (signed in place unless --out).
    bundle: PathBuf,
    /// The approver's private key. Repeatable.
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    #[arg(short, long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct CommandArgs {
    /// What to do: install, rollback, unpin, check-update, shadow-stop, ping.
    action: String,
    /// The fleet of the target device(s).
    #[arg(long)]
    fleet: String,
    /// The device id, or `all` for every device of the fleet.
    #[arg(long)]
    device: String,
    /// Operator private key(s), up to the root's operator threshold. Repeatable.
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    /// install: the bundle's URL.
    #[arg(long)]
    url: Option<String>,
    /// install: the bundle file (its digest is computed), or use --digest.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// install: SHA-256 (hex) of the bundle file.
    #[arg(long)]
    digest: Option<String>,
    /// rollback: the release it leaves (manifest hash as `ferry inspect`
    /// prints it, or a bundle file).
    #[arg(long)]
    from: Option<String>,
    /// rollback: a reason for the event log.
    #[arg(long)]
    reason: Option<String>,
    /// Command id (default: a random one).
    #[arg(long)]
    id: Option<String>,
}

pub fn root(cmd: RootCommand) -> Result<()> {
    match cmd {
        RootCommand::Init(a) => root_init(a),
        RootCommand::Sign(a) => root_sign(a),
        RootCommand::Verify(a) => root_verify(a),
    }
}

fn root_init(a: RootInitArgs) -> Result<()> {
    let mut keys = BTreeMap::new();
    let mut specs = BTreeMap::new();
    let mut role = |name: &str, files: &[PathBuf], threshold: usize| -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        for f in files {
            for k in read_public_keys(f)? {
                let id = k.key_id().to_string();
                keys.insert(id.clone(), k.to_pem());
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        specs.insert(
            name.to_string(),
            RoleSpec {
                keys: ids,
                threshold,
            },
        );
        Ok(())
    };
    role(roles::ROOT, &a.root, a.root_threshold)?;
    role(roles::BUILDER, &a.builder, a.builder_threshold)?;
    role(roles::APPROVER, &a.approver, a.approver_threshold)?;
    role(roles::OPERATOR, &a.operator, a.operator_threshold)?;
    role(roles::CHANNEL, &a.channel, a.channel_threshold)?;
    let document = RootDocument {
        schema: ROOT_SCHEMA,
        version: a.version,
        keys,
        roles: specs,
    };
    // Consistency (keys, thresholds, disjoint builder and approver) first.
    Root::from_document(document.clone())?;
    let mut body = serde_json::to_vec_pretty(&document)?;
    body.push(b'\n');
    let mut envelope = Envelope::new(ROOT_PAYLOAD_TYPE, &body);
    for k in &a.keys {
        envelope.sign(&read_secret_key(k)?)?;
    }
    write(&a.out, &envelope.to_json())?;
    println!(
        "wrote {} (root version {}, {} signature(s)); {}",
        a.out.display(),
        a.version,
        envelope.signatures.len(),
        threshold_note(&envelope)
    );
    Ok(())
}

fn threshold_note(envelope: &Envelope) -> String {
    match Root::from_envelope(&envelope.to_json()) {
        Ok(_) => "its root threshold is met".into(),
        Err(e) => format!("not yet usable: {e}"),
    }
}

fn root_sign(a: RootSignArgs) -> Result<()> {
    let bytes = read(&a.root)?;
    let mut envelope = Envelope::from_json(&bytes)?;
    parse_document(&envelope.payload_unverified()?)?;
    for k in &a.keys {
        envelope.sign(&read_secret_key(k)?)?;
    }
    let out = a.out.as_ref().unwrap_or(&a.root);
    write(out, &envelope.to_json())?;
    println!(
        "wrote {} ({} signature(s)); {}",
        out.display(),
        envelope.signatures.len(),
        threshold_note(&envelope)
    );
    Ok(())
}

fn root_verify(a: RootVerifyArgs) -> Result<()> {
    let bytes = read(&a.root)?;
    let root = match &a.previous {
        Some(prev) => {
            let previous = Root::from_envelope(&read(prev)?)
                .map_err(|e| fail(exit::REJECTED, anyhow::anyhow!("{}: {e}", prev.display())))?;
            previous.update(&bytes)
        }
        None => Root::from_envelope(&bytes),
    }
    .map_err(|e| fail(exit::REJECTED, anyhow::anyhow!("{}: {e}", a.root.display())))?;
    let d = root.document();
    println!("OK: root version {}", d.version);
    for (name, spec) in &d.roles {
        println!(
            "  {name}: {} of {} ({})",
            spec.threshold,
            spec.keys.len(),
            spec.keys.join(", ")
        );
    }
    if root.channel_policy().is_none() {
        println!("  (no channel role: devices accept unsigned channel indexes)");
    }
    Ok(())
}

pub fn approve(a: ApproveArgs) -> Result<()> {
    let bytes = read(&a.bundle)?;
    let keys = a
        .keys
        .iter()
        .map(|k| read_secret_key(k))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<_> = keys.iter().collect();
    let signed = add_signatures(&bytes, &refs).map_err(|e| {
        fail(
            exit::REJECTED,
            anyhow::anyhow!("{}: {e}", a.bundle.display()),
        )
    })?;
    let release = release_id_of(&signed).expect("just framed");
    let out = a.out.as_ref().unwrap_or(&a.bundle);
    write(out, &signed)?;
    println!(
        "wrote {} (release {release}, signed by {})",
        out.display(),
        keys.iter()
            .map(|k| k.key_id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

pub fn command(a: CommandArgs) -> Result<()> {
    let action = match a.action.as_str() {
        "install" => {
            let url = a.url.clone().context("install needs --url")?;
            let digest = match (&a.digest, &a.bundle) {
                (Some(d), _) => d.clone(),
                (None, Some(b)) => hex::encode(<sha2::Sha256 as sha2::Digest>::digest(read(b)?)),
                (None, None) => bail!("install needs --digest or --bundle"),
            };
            Action::Install { url, digest }
        }
        "rollback" => {
            let from = a
                .from
                .clone()
                .context("rollback needs --from (the release it leaves)")?;
            let from = if Path::new(&from).is_file() {
                release_id_of(&read(Path::new(&from))?)
                    .map_err(|e| anyhow::anyhow!("{from}: {e}"))?
            } else {
                from.trim_start_matches("sha256:").to_string()
            };
            Action::Rollback {
                reason: a.reason.clone(),
                from: Some(from),
            }
        }
        "unpin" => Action::Unpin,
        "check-update" => Action::CheckUpdate,
        "shadow-stop" => Action::ShadowStop,
        "ping" => Action::Ping,
        other => bail!(
            "unknown action {other:?}: install, rollback, unpin, check-update, shadow-stop or ping"
        ),
    };
    let now_ms = ferry_host::now_ms();
    let id = match &a.id {
        Some(id) => id.clone(),
        None => {
            let mut r = [0u8; 8];
            getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("{e}"))?;
            format!("offline-{now_ms}-{}", hex::encode(r))
        }
    };
    let mut c = Command {
        schema: SCHEMA_VERSION,
        id,
        issued_ms: now_ms,
        action,
        signature: None,
        signatures: Vec::new(),
    };
    let message = c.signing_bytes(&a.fleet, &a.device);
    for k in &a.keys {
        let key = read_secret_key(k)?;
        c.signatures.push(OperatorSignature {
            key_id: key.key_id().to_string(),
            signature: base64::engine::general_purpose::STANDARD
                .encode(key.sign_detached(&message)),
        });
    }
    println!("{}", serde_json::to_string(&c)?);
    eprintln!(
        "publish it on {}",
        ferry_protocol::topic(&a.fleet, &a.device, ferry_protocol::Topic::Command)
    );
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    ferry_host::write_durably(path, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
