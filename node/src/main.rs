//! The `fedmesh` binary: a pub/sub federation broker node for AI agents.

mod ann;
mod api;
mod audit;
mod bench;
mod client;
mod droplog;
mod http;
mod keyfile;
mod metrics;
mod node;
mod p2p;
mod store;
mod tlsgen;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedmesh_config::Config;

#[derive(Parser, Debug)]
#[command(name = "fedmesh", version, about = "A pub/sub federation broker node for AI agents", long_about = None)]
struct Cli {
    /// Config file (TOML). Without it, embedded defaults apply; FEDMESH_<SECTION>__<KEY> env vars override either.
    #[arg(long, short, global = true, env = "FEDMESH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (the broker, routing and durable task state).
    Run {
        /// Data directory (overrides node.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Extra bootstrap peer multiaddr (repeatable).
        #[arg(long)]
        bootstrap: Vec<String>,
    },
    /// Generate a node key (mode 0600) and print the node id.
    Keygen {
        /// Where to write it (default: the config's node.key_file).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing key (the node's identity changes).
        #[arg(long)]
        force: bool,
    },
    /// Write the documented default config file.
    Init {
        /// Where to write it.
        #[arg(default_value = "fedmesh.toml")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage and run agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Submit tasks.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Certificates for MQTT over TLS: a private CA, the listener's certificate, and client
    /// certificates for mutual TLS.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Inspect the tamper-evident audit log (of a running node through its HTTP server).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmarks that need the node's internals (not part of the interface).
    #[command(hide = true)]
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TlsCommand {
    /// Create a private CA (tls/ca.pem, tls/ca.key) and the listener's certificate and key at
    /// mqtt.tls_cert / mqtt.tls_key, for localhost, 127.0.0.1, ::1 and every --name. Clients
    /// trust tls/ca.pem (--tls-ca, mosquitto's --cafile). A running node picks the new files up
    /// within 10 s.
    Init {
        /// A host name or IP address clients connect to (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files (clients must then trust the new CA).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate whose CN is NAME, signed by the CA of `tls init`, as
    /// tls/clients/NAME.pem and NAME.key. A node with mqtt.tls_client_ca = "tls/ca.pem" takes
    /// its holder for principal NAME.
    Issue {
        /// The principal (agent name).
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing certificate of that name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file (and FEDMESH_ env overrides); exits non-zero naming the bad key.
    Check {
        /// The file (default: --config, or the embedded defaults).
        file: Option<PathBuf>,
    },
    /// Print the effective configuration.
    Show,
}

#[derive(clap::Args, Debug)]
struct MqttArgs {
    /// MQTT host of the node.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MQTT 3.1.1 port (default: the config's mqtt.listen_v4 port).
    #[arg(long)]
    port: Option<u16>,
    /// Username (from `fedmesh agent add`).
    #[arg(long, env = "FEDMESH_USERNAME")]
    username: Option<String>,
    /// Password (from `fedmesh agent add`).
    #[arg(long, env = "FEDMESH_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Connect over TLS (the node's mqtt.listen_tls), trusting the CA certificate(s) in this
    /// PEM file. The port then defaults to the config's mqtt.listen_tls port, else 8883.
    #[arg(long, env = "FEDMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: log in with this client certificate (PEM), for a node that requires
    /// them (mqtt.tls_client_ca). Its CN is the principal: no --username or --password.
    #[arg(long, env = "FEDMESH_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "FEDMESH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Create MQTT credentials for an agent; prints them once (stored hashed).
    Add {
        /// Agent name: 1-64 characters from [A-Za-z0-9_.-].
        name: String,
        /// Replace existing credentials.
        #[arg(long)]
        force: bool,
    },
    /// Remove an agent's credentials.
    Remove {
        /// Agent name.
        name: String,
    },
    /// List agents with credentials.
    List,
    /// Turn any command into an agent: task input on stdin, result from stdout.
    Exec {
        /// What the agent can do, in plain language.
        #[arg(long)]
        describe: String,
        /// Agent name (also the MQTT client id; default: the username, else "exec-<pid>").
        #[arg(long)]
        name: Option<String>,
        /// A skill tag (repeatable).
        #[arg(long = "skill")]
        skills: Vec<String>,
        /// An example request (repeatable).
        #[arg(long = "example")]
        examples: Vec<String>,
        /// Tasks run at once.
        #[arg(long, default_value_t = 4)]
        capacity: u16,
        /// Per-task timeout, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        #[command(flatten)]
        mqtt: MqttArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// Submit a task and wait for its result (printed on stdout).
    Submit {
        /// What to do, in plain language.
        description: String,
        /// Task input (text).
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Task input from a file ('-' for stdin).
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// A required skill (repeatable).
        #[arg(long = "skill")]
        skills: Vec<String>,
        /// A required policy label (repeatable).
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Idempotency key: resubmitting the same id returns the same task.
        #[arg(long)]
        request_id: Option<String>,
        /// Deadline, in seconds.
        #[arg(long, default_value_t = 60)]
        deadline_s: u64,
        /// Requester name (MQTT client id).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        mqtt: MqttArgs,
    },
}

/// Where `fedmesh audit` finds the log.
#[derive(clap::Args, Debug)]
struct AuditPlace {
    /// Data directory (overrides node.data_dir); read directly while the node is stopped.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Ask the running node at this HTTP address, never the database (default: the node is
    /// asked at the config's http.listen when it holds the database).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify the hash chain and signed checkpoints; names any changed, removed or reordered entry.
    Verify {
        #[command(flatten)]
        place: AuditPlace,
    },
    /// Print the last entries as JSON lines.
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: usize,
        /// Keep printing new entries (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        place: AuditPlace,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| match path {
        Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
        None => anyhow::anyhow!("{e}"),
    })
}

/// Logging to stderr filtered by `RUST_LOG` or `filter`, plus [`droplog::DropLog`], which
/// counts rumqttd's slow-subscriber drops whatever the filter (per-layer filters) and
/// replaces rumqttd's per-jump warnings in the log by a summary at most once a second.
fn init_tracing(filter: &str) {
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    // Colours on a terminal only: not in log files, `docker logs` or journald, and never
    // with NO_COLOR set (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (subscriber, summarizer) = droplog::subscriber(
        &filter,
        droplog::DropCounters::global(),
        std::io::stderr,
        ansi,
    );
    if subscriber.try_init().is_ok() {
        summarizer.spawn();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn connect_opts(
    cfg: &Config,
    mut mqtt: MqttArgs,
    name: Option<String>,
    fallback: &str,
) -> anyhow::Result<client::ConnectOpts> {
    let tls_client = mqtt.tls_cert.take().zip(mqtt.tls_key.take());
    if let Some((cert, _)) = &tls_client {
        // The node takes the certificate's CN as the principal; sent as the user name too
        // (it must then equal the CN), it names the agent's topics.
        let cn = fedmesh_broker::certificate_cn(cert)
            .with_context(|| format!("--tls-cert {}", cert.display()))?;
        if mqtt.username.as_ref().is_some_and(|u| *u != cn) {
            anyhow::bail!(
                "--username {:?} differs from the client certificate's CN {cn:?}; leave it out",
                mqtt.username.unwrap_or_default()
            );
        }
        mqtt.username = Some(cn);
    }
    let port = mqtt.port.unwrap_or_else(|| {
        if mqtt.tls_ca.is_some() {
            cfg.mqtt.listen_tls_addr().map_or(8883, |a| a.port())
        } else {
            cfg.mqtt.listen_v4_addr().map_or(1883, |a| a.port())
        }
    });
    let client_id = name
        .or_else(|| mqtt.username.clone())
        .unwrap_or_else(|| fallback.to_string());
    Ok(client::ConnectOpts {
        host: mqtt.host,
        port,
        username: mqtt.username,
        password: mqtt.password,
        client_id,
        tls_ca: mqtt.tls_ca,
        tls_client,
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            data_dir,
            bootstrap,
        } => {
            let mut cfg = load_config(cli.config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.node.data_dir = d.to_string_lossy().into_owned();
            }
            cfg.p2p.bootstrap.extend(bootstrap);
            cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            init_tracing(&cfg.node.log);
            runtime()?.block_on(node::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out, force } => {
            let cfg = load_config(cli.config.as_deref())?;
            let path = out.unwrap_or_else(|| cfg.key_path());
            let key = keyfile::generate(&path, force)?;
            eprintln!("wrote {}", path.display());
            println!("{}", key.node_id());
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { out, force } => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; pass --force to overwrite it",
                    out.display()
                );
            }
            std::fs::write(&out, fedmesh_config::DEFAULT_CONFIG_TOML)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {} (the documented defaults; edit and check with `fedmesh config check {}`)",
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let path = file.or(cli.config);
            match Config::load(path.as_deref()) {
                Ok(_) => {
                    println!(
                        "{}: ok",
                        path.as_deref()
                            .map_or("defaults".into(), |p| p.display().to_string())
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "{}: {e}",
                        path.as_deref()
                            .map_or("defaults".into(), |p| p.display().to_string())
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            print!("{}", cfg.to_toml_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { command } => agent_command(cli.config.as_deref(), command),
        Command::Tls { command } => {
            let cfg = load_config(cli.config.as_deref())?;
            let (cert, key) = cfg.tls_paths();
            match command {
                TlsCommand::Init { names, days, force } => {
                    let out = tlsgen::init(&cert, &key, &names, days, force)?;
                    println!("{}", out.ca.display());
                    eprintln!(
                        "CA {} (clients trust it: --tls-ca, --cafile); certificate {} and key {} for {}",
                        out.ca.display(),
                        out.cert.display(),
                        out.key.display(),
                        out.names.join(", ")
                    );
                }
                TlsCommand::Issue { name, days, force } => {
                    let dir = cert.parent().unwrap_or(Path::new(".")).join("clients");
                    let (c, k) = tlsgen::issue(&cert, &dir, &name, days, force)?;
                    println!("{}\n{}", c.display(), k.display());
                    eprintln!(
                        "client certificate for {name}: --tls-cert {} --tls-key {} (the node needs mqtt.tls_client_ca = the CA of `tls init`)",
                        c.display(),
                        k.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Task {
            command:
                TaskCommand::Submit {
                    description,
                    input,
                    input_file,
                    skills,
                    policies,
                    request_id,
                    deadline_s,
                    name,
                    mqtt,
                },
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            init_tracing("warn");
            let input = match (input, input_file) {
                (Some(s), _) => Some(s.into_bytes()),
                (None, Some(p)) if p.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                    Some(buf)
                }
                (None, Some(p)) => {
                    Some(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
                }
                (None, None) => None,
            };
            let connect = connect_opts(&cfg, mqtt, name, &format!("cli-{}", std::process::id()))?;
            let outcome = runtime()?.block_on(client::task_submit(client::SubmitOpts {
                connect,
                description,
                input,
                skills,
                policies,
                request_id,
                deadline: Duration::from_secs(deadline_s),
                wait: true,
            }))?;
            if let Some(out) = &outcome.output {
                use std::io::Write;
                std::io::stdout().write_all(out)?;
            }
            if outcome.state == "completed" {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "task {} {}: {}",
                    outcome.task_id,
                    outcome.state,
                    outcome.error.unwrap_or_default()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Bench { command } => {
            init_tracing("error");
            runtime()?.block_on(bench::run(command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => {
            let cfg = load_config(cli.config.as_deref())?;
            let place = |p: &AuditPlace| audit::Place {
                data_dir: p.data_dir.clone().unwrap_or_else(|| cfg.data_dir()),
                http: p
                    .http
                    .or_else(|| cfg.http.listen_addr().filter(|a| a.port() != 0)),
                http_only: p.http.is_some(),
            };
            match command {
                AuditCommand::Verify { place: p } => {
                    let node = || {
                        let key = keyfile::load(&resolve_key_path(&cfg, p.data_dir.as_deref()))?;
                        Ok(key.node_id())
                    };
                    let ok = runtime()?.block_on(audit::run_verify(&place(&p), node))?;
                    Ok(if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                AuditCommand::Tail {
                    n,
                    follow,
                    place: p,
                } => {
                    runtime()?.block_on(audit::run_tail(&place(&p), n, follow))?;
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

/// The key path for a data directory given on the command line (key_file is relative to it).
fn resolve_key_path(cfg: &Config, data_dir: Option<&Path>) -> PathBuf {
    match data_dir {
        Some(d) if Path::new(&cfg.node.key_file).is_relative() => d.join(&cfg.node.key_file),
        _ => cfg.key_path(),
    }
}

fn agent_command(config: Option<&Path>, command: AgentCommand) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let creds = cfg.credentials_path();
    match command {
        AgentCommand::Add { name, force } => {
            let password = fedmesh_broker::CredentialStore::add(&creds, &name, force)?;
            println!("username: {name}\npassword: {password}");
            eprintln!(
                "stored (hashed) in {}; the password is not shown again",
                creds.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Remove { name } => {
            fedmesh_broker::CredentialStore::remove(&creds, &name)?;
            eprintln!("removed {name}");
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::List => {
            for name in fedmesh_broker::CredentialStore::list(&creds)? {
                println!("{name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Exec {
            describe,
            name,
            skills,
            examples,
            capacity,
            timeout_s,
            mqtt,
            command,
        } => {
            init_tracing("info");
            let connect = connect_opts(&cfg, mqtt, name, &format!("exec-{}", std::process::id()))?;
            runtime()?.block_on(client::agent_exec(client::ExecOpts {
                connect,
                describe,
                skills,
                examples,
                capacity,
                command,
                timeout: Duration::from_secs(timeout_s),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
