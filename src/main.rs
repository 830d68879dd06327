//! The `polyburn` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use polyburn::bench::{self, TrainBenchOptions};
use polyburn::config::Config;
use polyburn::data::{TOKENIZER_FILE, TextTokenizer};
use polyburn::model::generate::{Decoding, SamplingOptions, generate_batch};
use polyburn::sweep::{Sweep, run_sweep, write_report};
use polyburn::train::checkpoint;
use polyburn::train::trainer::{load_checkpointed_model, requested_step, saved_config};
use polyburn::train::{self, TrainOptions};
use burn::tensor::Device;

/// Counts live heap bytes so `bench kernels` and `bench train` can report peak memory.
#[global_allocator]
static ALLOCATOR: polyburn::memory::PeakAlloc = polyburn::memory::PeakAlloc;

#[derive(Parser)]
#[command(name = "polyburn", version, about = "Train language models from YAML configs on Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a YAML config.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        /// Continue from the latest checkpoint in the run's output_dir if there is one.
        #[arg(long)]
        resume: bool,
    },
    /// Continue a run from its latest complete checkpoint.
    Resume {
        /// The run directory (its output_dir).
        run_dir: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Generate text from a trained run.
    Generate(GenerateArgs),
    /// Score a run on its held-out prompts: pass@k, coverage@k, diversity, reward.
    Eval {
        #[arg(long)]
        run: PathBuf,
        /// The k of pass@k and coverage@k (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
        k: Vec<usize>,
        /// Replies sampled per prompt.
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// Print one JSON object instead of the markdown report.
        #[arg(long)]
        json: bool,
        /// Use this checkpoint step instead of the latest.
        #[arg(long, conflicts_with = "best")]
        step: Option<u64>,
        /// Use the best checkpoint (`checkpoint.keep_best`).
        #[arg(long)]
        best: bool,
        /// Sentence encoder for semantic diversity (hub id or folder), or `none` to skip it.
        #[arg(long, default_value = polyburn::model::encoder::DEFAULT_ENCODER)]
        encoder: String,
        /// Sampling temperature (default: the run's objective.sampling.temperature).
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print sentence embeddings, one JSON object per text: `{"text": ..., "embedding": [...]}`.
    /// Reads one text per line from stdin when neither --text nor --file is given.
    Embed {
        /// Sentence encoder: a Hugging Face hub id (through the HF cache) or a model folder.
        #[arg(long, default_value = polyburn::model::encoder::DEFAULT_ENCODER)]
        model: String,
        /// A text to embed (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// A file with one text per line.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Train every combination of a grid of config values (resumable), then report.
    Sweep {
        /// The sweep file (base config + grid).
        sweep: PathBuf,
        /// Runs trained at the same time (each is its own process).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Where the sweep writes (overrides the sweep file's output_dir).
        #[arg(long)]
        output_dir: Option<PathBuf>,
        /// Override a config field in every run (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        /// Only (re)write summary.md, summary.csv and eval_loss.png from the runs so far.
        #[arg(long)]
        report: bool,
        /// Print one self-contained command line per unfinished run (for a Slurm job array,
        /// GNU parallel, ...) instead of training.
        #[arg(long)]
        list: bool,
    },
    /// Write a run's checkpoint as a Hugging Face model folder (GPT-2 or Llama/Qwen2 shape).
    Export {
        #[arg(long)]
        run: PathBuf,
        /// The folder to write (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        /// Export this checkpoint step instead of the latest.
        #[arg(long, conflicts_with = "best")]
        step: Option<u64>,
        /// Export the best checkpoint (`checkpoint.keep_best`).
        #[arg(long)]
        best: bool,
        /// LoRA runs: fold the adapters into the base weights and export a full model
        /// (without it, the adapters alone are written in the PEFT layout).
        #[arg(long)]
        merge: bool,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Override a config field, e.g. `--set optimizer.learning_rate=3e-4` (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    overrides: Vec<String>,
    /// Stop with a checkpoint once the global step reaches N (resume later).
    #[arg(long, value_name = "N")]
    stop_at_step: Option<u64>,
    /// No progress output on stderr (metrics and TensorBoard files are still written).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["run", "model"])))]
struct GenerateArgs {
    /// Run directory to load the latest checkpoint and tokenizer from.
    #[arg(long)]
    run: Option<PathBuf>,
    /// A Hugging Face model folder, or a hub id in the local Hugging Face cache.
    #[arg(long)]
    model: Option<String>,
    /// Print one JSON line per reply: `{"reply": i, "prompt_ids": [...], "ids": [...], "text": ...}`
    /// (ids: new tokens only).
    #[arg(long)]
    json: bool,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the tokenizer's chat template (the run's or
    /// the model's), ending with the assistant's generation prompt.
    #[arg(long)]
    chat: bool,
    /// Replies to sample for the prompt, generated together in one batch.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Keep only the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Always take the most likely token (same as --temperature 0).
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use this checkpoint step instead of the latest.
    #[arg(long, conflicts_with = "best")]
    step: Option<u64>,
    /// Use the best checkpoint (`checkpoint.keep_best`).
    #[arg(long)]
    best: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenizerKind {
    Char,
    Bpe,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Build a tokenizer from text files and save it as tokenizer.json.
    Train {
        /// Text files to learn from.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = TokenizerKind::Bpe)]
        kind: TokenizerKind,
        /// Target vocabulary size (bpe only).
        #[arg(long, default_value_t = 1024)]
        vocab_size: usize,
        #[arg(long, default_value = TOKENIZER_FILE)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput, matmul GFLOP/s and model-FLOPs utilisation, measured in one run.
    Train {
        #[arg(long, default_value = "configs/bench.yaml")]
        config: PathBuf,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        /// Timed optimizer steps (after warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Training attention: `fused` or `reference` (sets kernels.attention).
        #[arg(long)]
        attention: Option<String>,
        /// Also time the steps with training.gradient_checkpointing (per-block recomputation)
        /// and report its peak memory and time against the plain steps.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Also train on the config's JSONL data.train one record per row and packed
        /// (data.pack), and report tokens/s (padding excluded) of both.
        #[arg(long)]
        pack: bool,
    },
    /// Every fused op against its reference over a size sweep: median time and peak memory.
    Kernels {
        /// Print one JSON array of records instead of a table.
        #[arg(long)]
        json: bool,
        /// Attention sequence lengths (B = 4, H = 4, Dh = 64, causal, forward + backward).
        #[arg(long, value_delimiter = ',', default_value = "128,256,512,1024,2048")]
        attention_t: Vec<usize>,
        /// Diversity group counts (N = 8, D = 384, forward + backward).
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
        diversity_g: Vec<usize>,
        /// LCS sequence lengths (64 groups × 8 sequences).
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
        lcs_l: Vec<usize>,
        /// LM head + cross-entropy rows (tokens; D = 256, V = 8192, forward + backward).
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        cross_entropy_n: Vec<usize>,
        /// Timed runs per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Batched generation with the KV cache vs full recomputation, in one run.
    Generate {
        #[arg(long, default_value = "configs/bench.yaml")]
        config: PathBuf,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value_t = 8)]
        prompts: usize,
        /// Replies per prompt.
        #[arg(long, default_value_t = 8)]
        n: usize,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long)]
        json: bool,
    },
    /// Milliseconds per sampling-objective step, split into generate / encode / diversity /
    /// forward / backward.
    Polychromic {
        #[arg(long, default_value = "configs/polychromic_base.yaml")]
        config: PathBuf,
        /// Override a config field (the default objective is `polychromic_rl` with semantic diversity).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    polyburn::memory::keep_freed_memory();
    let cli = Cli::parse();
    let result = install_interrupt_handler().and_then(|_| run(cli));
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<train::trainer::RunLocked>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(train::trainer::RUN_LOCKED_EXIT)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// First Ctrl-C: checkpoint after the current step and stop. Second: exit at once.
fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if train::interrupted() {
            eprintln!("\ninterrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to abort)");
        train::request_interrupt();
    })
    .context("installing the Ctrl-C handler")
}

/// One function per command; this only dispatches.
fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train { config, run, resume } => train_command(&config, resume, &run),
        Command::Resume { run_dir, run } => resume_command(&run_dir, &run),
        Command::Generate(args) => generate_command(args),
        Command::Embed { model, text, file } => embed_command(&model, text, file),
        Command::Eval { run, k, samples, json, step, best, encoder, temperature, seed } => {
            let step = requested_step(&run, step, best)?;
            let encoder = (encoder != "none").then_some(encoder);
            let sampling = polyburn::eval::HeldOutOptions { k, samples, temperature, seed };
            eval_command(&run, polyburn::eval::EvalOptions { sampling, step, encoder }, json)
        }
        Command::Export { run, out, step, best, merge } => export_command(&run, &out, requested_step(&run, step, best)?, merge),
        Command::Sweep { sweep, jobs, output_dir, overrides, report, list } => {
            sweep_command(&sweep, jobs, output_dir.as_deref(), &overrides, SweepAction::from_flags(report, list))
        }
        Command::Tokenizer { command: TokenizerCommand::Train { inputs, kind, vocab_size, output } } => {
            tokenizer_command(&inputs, kind, vocab_size, &output)
        }
        Command::Bench { command } => bench_command(command),
    }
}

fn train_command(config: &Path, resume: bool, run: &RunArgs) -> Result<ExitCode> {
    let config = Config::load(config, &run.overrides)?;
    train_and_report(config, resume, run)
}

fn resume_command(run_dir: &Path, run: &RunArgs) -> Result<ExitCode> {
    let config = saved_config(run_dir, &run.overrides)?;
    if checkpoint::latest_checkpoint(run_dir)?.is_none() {
        bail!("{} has no complete checkpoint to resume from", run_dir.display());
    }
    train_and_report(config, true, run)
}

fn eval_command(run: &Path, options: polyburn::eval::EvalOptions, json: bool) -> Result<ExitCode> {
    let report = polyburn::eval::evaluate_run(run, &options)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.markdown(&run.display().to_string()));
    }
    Ok(ExitCode::SUCCESS)
}

fn export_command(run: &Path, out: &Path, step: Option<u64>, merge: bool) -> Result<ExitCode> {
    let r = load_checkpointed_model(run, step)?;
    match (&r.config.lora, merge) {
        (Some(lora), false) => {
            polyburn::model::hf::export_lora_adapters(&r.model, &r.model_config, lora, r.config.model.pretrained.as_deref(), out)?
        }
        _ => {
            let merged = r.model.merge_lora();
            polyburn::model::hf::export_pretrained(&merged, &r.model_config, &r.tokenizer, out)?
        }
    }
    println!("wrote {} (step {})", out.display(), r.checkpoint.step);
    Ok(ExitCode::SUCCESS)
}

/// What `polyburn sweep` does.
#[derive(Clone, Copy, PartialEq)]
enum SweepAction {
    Train,
    ReportOnly,
    List,
}

impl SweepAction {
    fn from_flags(report: bool, list: bool) -> Self {
        if list {
            SweepAction::List
        } else if report {
            SweepAction::ReportOnly
        } else {
            SweepAction::Train
        }
    }
}

fn sweep_command(file: &Path, jobs: usize, output_dir: Option<&Path>, overrides: &[String], action: SweepAction) -> Result<ExitCode> {
    let sweep = Sweep::load(file, overrides, output_dir)?;
    if action == SweepAction::List {
        let exe = std::env::current_exe().context("locating the polyburn executable")?;
        for line in polyburn::sweep::pending_commands(&sweep, &exe)? {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let failed = if action == SweepAction::ReportOnly { Vec::new() } else { run_sweep(&sweep, jobs)? };
    write_report(&sweep)?;
    println!("report: {}", sweep.output_dir.join("summary.md").display());
    if train::interrupted() {
        eprintln!("sweep interrupted; run the same command again to continue");
        return Ok(ExitCode::from(130));
    }
    if !failed.is_empty() {
        bail!("{} of {} runs failed: {}", failed.len(), sweep.runs.len(), failed.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn tokenizer_command(inputs: &[PathBuf], kind: TokenizerKind, vocab_size: usize, output: &Path) -> Result<ExitCode> {
    let texts = inputs
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let texts = texts.iter().map(String::as_str);
    let tokenizer = match kind {
        TokenizerKind::Char => TextTokenizer::build_char_level(texts)?,
        TokenizerKind::Bpe => TextTokenizer::train_byte_bpe(texts, vocab_size)?,
    };
    tokenizer.save(output)?;
    println!("wrote {} ({} tokens)", output.display(), tokenizer.vocab_size());
    Ok(ExitCode::SUCCESS)
}

fn bench_command(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Train { config, mut overrides, steps, json, attention, gradient_checkpointing, pack } => {
            if let Some(a) = attention {
                overrides.push(format!("kernels.attention={a}"));
            }
            let config = Config::load(&config, &overrides)?;
            let options = TrainBenchOptions { timed_steps: steps, compare_gradient_checkpointing: gradient_checkpointing, compare_packing: pack };
            print_report(&bench::bench_train(&config, &options)?, json)
        }
        BenchCommand::Kernels { json, attention_t, diversity_g, lcs_l, cross_entropy_n, repeats } => {
            let options = polyburn::kernel_bench::KernelBenchOptions { attention_t, diversity_g, lcs_l, cross_entropy_n, repeats: repeats.max(1) };
            let table = polyburn::kernel_bench::bench_kernels(&options)?;
            if json {
                println!("{}", serde_json::to_string(&table.0)?);
            } else {
                print!("{table}");
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Generate { config, overrides, prompts, n, max_new_tokens, json } => {
            let config = Config::load(&config, &overrides)?;
            print_report(&bench::bench_generate(&config, prompts, n, max_new_tokens)?, json)
        }
        BenchCommand::Polychromic { config, overrides, steps, json } => {
            let mut sets = vec!["objective.type=polychromic_rl".to_string(), "objective.diversity=semantic".to_string()];
            sets.extend(overrides);
            let config = Config::load(&config, &sets)?;
            print_report(&bench::bench_polychromic(&config, steps)?, json)
        }
    }
}

fn print_report<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn train_and_report(config: Config, resume: bool, run: &RunArgs) -> Result<ExitCode> {
    let options = TrainOptions { resume, stop_at_step: run.stop_at_step, quiet: run.quiet };
    let outcome = train::train(config, &options)?;
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    println!(
        "step {}: train loss {}, eval loss {} ({})",
        outcome.global_step,
        fmt(outcome.final_train_loss),
        fmt(outcome.final_eval_loss),
        outcome.run_dir.display()
    );
    if let Some(reason) = &outcome.early_stopped {
        println!("{reason}");
    }
    // Ctrl-C (not a planned --stop-at-step) ends with the conventional interrupt status.
    Ok(if outcome.interrupted && train::interrupted() { ExitCode::from(130) } else { ExitCode::SUCCESS })
}

fn embed_command(model: &str, mut texts: Vec<String>, file: Option<PathBuf>) -> Result<ExitCode> {
    use std::io::{BufRead, Write};
    let read_lines = |r: &mut dyn BufRead, name: &str| -> Result<Vec<String>> {
        r.lines().collect::<std::io::Result<Vec<_>>>().with_context(|| format!("reading {name}"))
    };
    if let Some(path) = &file {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        texts.extend(read_lines(&mut std::io::BufReader::new(f), &path.display().to_string())?);
    }
    if texts.is_empty() && file.is_none() {
        texts = read_lines(&mut std::io::stdin().lock(), "stdin")?;
    }
    let encoder = polyburn::model::encoder::SentenceEncoder::load(model, &Device::flex())?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = encoder.embed(&refs)?;
    let mut out = std::io::stdout().lock();
    for (text, embedding) in texts.iter().zip(embeddings) {
        writeln!(out, "{}", serde_json::json!({"text": text, "embedding": embedding}))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn generate_command(args: GenerateArgs) -> Result<ExitCode> {
    let (model, tokenizer, stop_token, global_step, device) = match (&args.run, &args.model) {
        (Some(run), _) => {
            let r = load_checkpointed_model(run, requested_step(run, args.step, args.best)?)?;
            let eos = r.tokenizer.eos_id();
            (r.model, r.tokenizer, eos, r.checkpoint.state()?.global_step, r.device)
        }
        (None, Some(id)) => {
            let device = Device::flex();
            let p = polyburn::model::hf::load_pretrained(id, &device)?;
            (p.model, p.tokenizer, p.eos_token_id, 0, device)
        }
        (None, None) => unreachable!("clap requires --run or --model"),
    };
    let options = SamplingOptions {
        temperature: if args.greedy { 0.0 } else { args.temperature },
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        stop_token,
        seed: args.seed,
    };
    let prompt_text = if args.chat {
        let template = tokenizer.chat_template().context(
            "--chat: this tokenizer has no chat template (train with data.chat_template, or use a model whose \
             tokenizer_config.json has one)",
        )?;
        template.render(&[polyburn::data::chat::ChatMessage::new("user", &args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&prompt_text)?;
    let context = polyburn::model::ForwardContext::at_step(global_step);
    let replies = generate_batch(&model, &[prompt.clone()], args.n, &options, &context, Decoding::KvCache, &device)?;
    for (i, new) in replies[0].iter().enumerate() {
        let text = tokenizer.decode(new)?;
        if args.json {
            println!("{}", serde_json::json!({"reply": i, "prompt_ids": prompt, "ids": new, "text": text}));
        } else {
            if args.n > 1 {
                println!("--- reply {i}");
            }
            println!("{prompt_text}{text}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
