//! `wisp plugin new` and `wisp plugin build`: start a plugin folder in Rust, Python or
//! JavaScript from the templates, and build one into a component (cargo, componentize-py,
//! componentize-js), optionally installing it as a complete model folder.
//!
//! The WIT interface and the SDKs are compiled into the binary, so a plugin folder can live
//! anywhere: a Rust plugin gets its own copy of the SDK (`sdk/`); a Python or JavaScript
//! plugin's build gets the interface and the SDK in a temporary folder (JavaScript: the SDK
//! put in front of app.js, one module, as componentize-js takes).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

const WIT: &str = include_str!("../../../../wit/plugin.wit");
const PYTHON_SDK: &str = include_str!("../../../../plugins/python/sdk/wisp_plugin/__init__.py");
const PYTHON_TEMPLATE: &str = include_str!("../../../../plugins/python/template/app.py");
const PYTHON_CONFIG: &str = include_str!("../../../../plugins/python/template/config.toml");
const RUST_SDK_LIB: &str = include_str!("../../../../plugins/sdk/src/lib.rs");
const RUST_SDK_TENSOR: &str = include_str!("../../../../plugins/sdk/src/tensor.rs");
const RUST_TEMPLATE: &str = include_str!("../../../../plugins/template/src/lib.rs");
const RUST_CONFIG: &str = include_str!("../../../../plugins/template/config.toml");
const JS_SDK: &str = include_str!("../../../../plugins/js/sdk/wisp_plugin.js");
const JS_TEMPLATE: &str = include_str!("../../../../plugins/js/template/app.js");
const JS_CONFIG: &str = include_str!("../../../../plugins/js/template/config.toml");
/// The toolchain `wisp plugin build` runs for JavaScript (plugins/js/package.json pins it).
const COMPONENTIZE_JS: &str = "componentize-js";
/// The toolchain `wisp plugin build` runs for Python (scripts/plugin-toolchains.sh pins it).
const COMPONENTIZE_PY: &str = "componentize-py";

#[derive(Args, Debug)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Start a plugin folder: source from the template, build settings and config.toml.
    New(NewArgs),
    /// Build a plugin folder into a component (model.wasm in the folder).
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The plugin's name: letters, digits and '_'.
    pub name: String,
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// Where to create it (default: ./NAME).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The plugin folder (Cargo.toml: Rust; app.py: Python).
    pub dir: PathBuf,
    /// Also make REPOSITORY/MODEL a complete model folder: the plugin's config.toml and
    /// 1/model.wasm, ready to serve.
    #[arg(long)]
    pub install: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

pub fn run(args: PluginArgs) -> Result<()> {
    match args.command {
        PluginCommand::New(args) => new(&args),
        PluginCommand::Build(args) => {
            let component = build(&args.dir)?;
            println!("built {}", component.display());
            if let Some(model) = &args.install {
                install(&args.dir, &component, model)?;
                println!("installed {}", model.display());
            }
            Ok(())
        }
    }
}

fn new(args: &NewArgs) -> Result<()> {
    let name = &args.name;
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        bail!("plugin name '{name}' must be letters, digits and '_', not starting with a digit");
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!("{} exists; choose another --dir", dir.display());
    }
    let files: Vec<(PathBuf, String)> = match args.lang {
        Lang::Python => vec![
            ("app.py".into(), PYTHON_TEMPLATE.to_string()),
            ("config.toml".into(), PYTHON_CONFIG.to_string()),
        ],
        Lang::Js => vec![
            ("app.js".into(), JS_TEMPLATE.to_string()),
            ("config.toml".into(), JS_CONFIG.to_string()),
        ],
        Lang::Rust => vec![
            (
                "Cargo.toml".into(),
                format!(
                    "[package]\nname = \"{}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                     [lib]\ncrate-type = [\"cdylib\"]\n\n\
                     [dependencies]\nwisp-plugin-sdk = {{ path = \"sdk\" }}\n\n\
                     # A workspace of its own, wherever the folder is.\n[workspace]\n\n\
                     [profile.release]\nstrip = \"debuginfo\"\nlto = true\n",
                    name.replace('_', "-")
                ),
            ),
            ("src/lib.rs".into(), RUST_TEMPLATE.to_string()),
            ("config.toml".into(), RUST_CONFIG.to_string()),
            (
                "sdk/Cargo.toml".into(),
                "[package]\nname = \"wisp-plugin-sdk\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                 [dependencies]\nwit-bindgen = \"0.46\"\n"
                    .into(),
            ),
            (
                "sdk/src/lib.rs".into(),
                RUST_SDK_LIB.replace("path: \"../../wit\"", "path: \"wit\""),
            ),
            ("sdk/src/tensor.rs".into(), RUST_SDK_TENSOR.to_string()),
            ("sdk/wit/plugin.wit".into(), WIT.to_string()),
        ],
    };
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "created {} ({:?}); build it with `wisp plugin build {} --install REPOSITORY/{name}`",
        dir.display(),
        args.lang,
        dir.display()
    );
    Ok(())
}

/// Builds the plugin in `dir`; returns the component's path.
fn build(dir: &Path) -> Result<PathBuf> {
    if dir.join("Cargo.toml").is_file() {
        build_rust(dir)
    } else if dir.join("app.py").is_file() {
        build_python(dir)
    } else if dir.join("app.js").is_file() {
        build_js(dir)
    } else {
        bail!(
            "{} is not a plugin folder: it has no Cargo.toml (Rust), app.py (Python) or app.js (JavaScript)",
            dir.display()
        )
    }
}

fn build_rust(dir: &Path) -> Result<PathBuf> {
    let manifest: toml::Value = toml::from_str(
        &std::fs::read_to_string(dir.join("Cargo.toml")).context("cannot read Cargo.toml")?,
    )
    .context("Cargo.toml is not TOML")?;
    let package = manifest
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .context("Cargo.toml has no package.name")?
        .replace('-', "_");
    run_tool(
        Command::new("cargo")
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(dir),
        "cargo (the wasm32-wasip2 target: `rustup target add wasm32-wasip2`)",
    )?;
    let built = dir
        .join("target/wasm32-wasip2/release")
        .join(format!("{package}.wasm"));
    if !built.is_file() {
        bail!("cargo built no {}", built.display());
    }
    let component = dir.join("model.wasm");
    std::fs::copy(&built, &component)
        .with_context(|| format!("cannot copy {} to {}", built.display(), component.display()))?;
    Ok(component)
}

fn build_python(dir: &Path) -> Result<PathBuf> {
    let tool = componentize_py()?;
    // The interface and the SDK, where componentize-py finds them.
    let support = tempfile::tempdir().context("cannot create a temporary folder")?;
    std::fs::create_dir_all(support.path().join("wit"))?;
    std::fs::write(support.path().join("wit/plugin.wit"), WIT)?;
    std::fs::create_dir_all(support.path().join("sdk/wisp_plugin"))?;
    std::fs::write(
        support.path().join("sdk/wisp_plugin/__init__.py"),
        PYTHON_SDK,
    )?;
    let component = dir.join("model.wasm");
    run_tool(
        Command::new(&tool)
            .arg("-d")
            .arg(support.path().join("wit"))
            .args(["-w", "plugin", "componentize", "app", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(support.path().join("sdk"))
            .arg("-o")
            .arg(&component),
        &format!("{} (componentize-py)", tool.display()),
    )?;
    Ok(component)
}

fn build_js(dir: &Path) -> Result<PathBuf> {
    let tool = toolchain(
        COMPONENTIZE_JS,
        "WISP_COMPONENTIZE_JS",
        ".venv-plugins/node/node_modules/.bin",
    )?;
    let app = std::fs::read_to_string(dir.join("app.js")).context("cannot read app.js")?;
    // componentize-js reads its files relative to where it runs: one folder with all of them.
    let work = tempfile::tempdir().context("cannot create a temporary folder")?;
    std::fs::create_dir_all(work.path().join("wit"))?;
    std::fs::write(work.path().join("wit/plugin.wit"), WIT)?;
    std::fs::write(work.path().join("plugin.js"), format!("{JS_SDK}\n{app}"))?;
    run_tool(
        Command::new(&tool)
            .args(["--wit", "wit", "--world-name", "plugin"])
            // No wasi:http: the sandbox has no network.
            .args(["-d", "http", "fetch-event", "-o", "model.wasm", "plugin.js"])
            .current_dir(work.path()),
        &format!("{} (componentize-js)", tool.display()),
    )?;
    let component = dir.join("model.wasm");
    std::fs::copy(work.path().join("model.wasm"), &component)
        .with_context(|| format!("cannot write {}", component.display()))?;
    Ok(component)
}

/// componentize-py (see `toolchain`).
fn componentize_py() -> Result<PathBuf> {
    toolchain(COMPONENTIZE_PY, "WISP_COMPONENTIZE_PY", ".venv-plugins/bin")
}

/// A plugin toolchain's program: $`variable`, else on PATH, else in the project's
/// `.venv-plugins` (scripts/plugin-toolchains.sh) above this binary.
fn toolchain(program: &str, variable: &str, project_dir: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Ok(path.into());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join(project_dir).join(program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "{program} not found: run scripts/plugin-toolchains.sh (it installs the pinned toolchains \
         into .venv-plugins), install it yourself, or set {variable}"
    )
}

fn run_tool(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Makes `model` a model folder: `config.toml` from the plugin folder, `1/model.wasm`.
fn install(dir: &Path, component: &Path, model: &Path) -> Result<()> {
    let config = dir.join("config.toml");
    if !config.is_file() {
        bail!("{} has no config.toml to install", dir.display());
    }
    let version = model.join("1");
    std::fs::create_dir_all(&version)
        .with_context(|| format!("cannot create {}", version.display()))?;
    std::fs::copy(&config, model.join("config.toml"))
        .with_context(|| format!("cannot copy {}", config.display()))?;
    std::fs::copy(component, version.join("model.wasm"))
        .with_context(|| format!("cannot copy {}", component.display()))?;
    Ok(())
}
