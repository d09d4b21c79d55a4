//! The `lora-graft` command line: runs the jobs and says what they wrote.

mod cli;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use cli::{clap_error, parse_alpha, variant_names, Cli, Command, ExportFormat, GraftArgs};
use lora_graft::adapter::{AdapterOverrides, LoadedAdapter, OnnxAdapter};
use lora_graft::commit::Commit;
use lora_graft::jobs::{self, OutputPlan, TrainingRequest};
use lora_graft::model::{SaveOptions, SaveReport};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::graft::inputs::InputBase;
use lora_graft::passes::target;
use lora_graft::train::{self, TrainOptions};
use lora_graft::{inspect, Error, Model, Result};

fn main() -> ExitCode {
    // Output piped into a program that stops reading (`| head`) ends the process quietly,
    // as for any Unix tool, instead of failing on the closed pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // One malloc arena for the process (glibc makes one per thread): training workers
    // free tensors of every size step after step, and per-thread arenas each keep their
    // own freed pages. Measured on the training benchmark (batch 8 x 128, 2 workers):
    // peak RSS 470 -> 392 MB (int4), 589 -> 512 MB (fp32), steps/s unchanged or better.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets an allocator parameter before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else {
        return graft(cli.graft);
    };
    match command {
        Command::Inspect { model, json } => {
            if is_onnx_adapter(&model)? {
                let adapter = OnnxAdapter::read(&model)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&onnx_adapter_json(&adapter))
                            .expect("serialisable")
                    );
                } else {
                    print!("{adapter}");
                }
                return Ok(());
            }
            let model = Model::load(&model)?;
            let report = inspect::Report::new(&model);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else {
                print!("{report}");
            }
        }
        Command::Grad {
            model,
            variant,
            filters,
            loss,
            batch,
            seq,
            keep_outputs,
            output,
        } => {
            let mut graft = variant.request(&filters)?;
            graft.calibration = variant.calibration.request(None, batch, seq, None, None);
            let req = TrainingRequest {
                graft,
                loss,
                batch,
                seq,
                micro_batch: None,
                output: None,
                keep_outputs,
            };
            let name = format!("{}.train", req.graft.variant.name());
            let (out, adapter_path) = jobs::default_paths(&model, &name, output.as_deref(), None);
            let mut training = jobs::training_graph(Model::load(&model)?, &req)?;
            // Written for any runtime: no lora-graft kernels in it.
            let opset = lora_graft::passes::graft::default_opset(&training.model.proto);
            lora_graft::passes::grad::portable(&mut training.model.graph, opset)?;
            let adapter = training.outcome.adapter_file(&req.graft);
            let report = jobs::write(&training.model, &adapter, &out, &adapter_path)?;
            println!(
                "training graph: loss ({}) and {} gradients, {} forward nodes differentiated",
                loss_name(loss),
                training.graph.gradients.len(),
                training.graph.differentiated
            );
            print_saved(&report);
            println!("wrote {} (initial adapter values)", adapter_path.display());
        }
        Command::Train {
            model,
            variant,
            filters,
            data,
            eval,
            tokenizer,
            loss,
            loss_output,
            steps,
            batch,
            seq,
            micro_batch,
            lr,
            weight_decay,
            warmup,
            schedule,
            grad_clip,
            save_every,
            resume,
            threads,
            output,
            emit_model,
            quiet,
        } => {
            reuse_freed_memory();
            let mut graft = variant.request(&filters)?;
            graft.calibration =
                variant
                    .calibration
                    .request(tokenizer.clone(), batch, seq, Some(loss), threads);
            // A resumed run takes every value, frozen ones included, from its checkpoint.
            graft.values_from_file = resume.is_some();
            let opts = TrainOptions {
                training: TrainingRequest {
                    graft,
                    loss,
                    batch,
                    seq,
                    micro_batch,
                    output: loss_output,
                    keep_outputs: false,
                },
                data,
                tokenizer,
                eval,
                steps,
                lr,
                weight_decay,
                warmup,
                schedule,
                grad_clip,
                seed: variant.seed,
                save_every,
                resume,
                output,
                emit_model,
                threads: threads.unwrap_or_else(cli::every_core),
                quiet,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
            let report = train::run(&model, &opts, stop)?;
            let (first, last) = (
                report.losses.first().copied().unwrap_or(f64::NAN),
                report.losses.last().copied().unwrap_or(f64::NAN),
            );
            if report.interrupted {
                println!("interrupted at step {}; checkpoint saved", report.steps);
            }
            println!("{} steps: loss {first:.4} -> {last:.4}", report.steps);
            println!("wrote {}", opts.output.display());
            if let Some(p) = &opts.emit_model {
                println!("wrote {}", p.display());
            }
        }
        Command::Merge {
            model,
            adapter,
            output,
            pissa_base,
            dequantize,
            requantize,
            file,
        } => {
            use lora_graft::passes::merge::QuantizedWeights;
            let quantized = match (dequantize, requantize) {
                (true, _) => QuantizedWeights::Dequantize,
                (_, true) => QuantizedWeights::Requantize,
                _ => QuantizedWeights::Refuse,
            };
            let overrides = file.overrides()?;
            let adapter = LoadedAdapter::read(&adapter, &overrides)?;
            let out = output.unwrap_or_else(|| jobs::default_paths(&model, "merged", None, None).0);
            let mut m = Model::load(&model)?;
            OutputPlan::default()
                .read_model(&m)?
                .read("adapter file", &adapter.path)
                .write_model("output model", &m, &out)?
                .check()?;
            // Merged weights go to the output's data file as they are made.
            let mut commit = lora_graft::commit::Commit::new();
            let sink = m.data_sink(&out, &mut commit)?;
            let merged =
                jobs::merge_writing_to(&mut m, &adapter, pissa_base, quantized, sink.as_ref())?;
            let report = m.stage_save(&out, &SaveOptions::default(), &mut commit, sink.as_ref())?;
            commit.commit()?;
            println!(
                "merged {} modules of {} ({}) into their weights",
                merged.modules,
                adapter.path.display(),
                adapter.req.variant.name()
            );
            if !merged.requantized.is_empty() {
                let mut errors: Vec<f64> = merged.requantized.iter().map(|e| e.1).collect();
                errors.sort_by(f64::total_cmp);
                println!(
                    "requantized {} weights in their own format: ‖W_q − W‖/‖W‖ median {:.3e}, max {:.3e} ('{}')",
                    errors.len(),
                    errors[errors.len() / 2],
                    errors[errors.len() - 1],
                    merged
                        .requantized
                        .iter()
                        .max_by(|a, b| a.1.total_cmp(&b.1))
                        .map_or("", |e| e.0.as_str())
                );
            }
            print_saved(&report);
        }
        Command::ExportAdapter {
            adapter,
            model,
            format,
            output,
            adapter_version,
            model_version,
            file,
        } => {
            let overrides = file.overrides()?;
            let loaded = LoadedAdapter::read(&adapter, &overrides)?;
            let m = model.as_deref().map(Model::load).transpose()?;
            let mut plan = OutputPlan::default().read("adapter file", &adapter);
            if let Some(m) = &m {
                plan = plan.read_model(m)?;
            }
            let mut commit = Commit::new();
            let (what, out) = match format {
                ExportFormat::OnnxAdapter => {
                    let m = m.as_ref().ok_or_else(|| {
                        Error::Usage(
                            "--format onnx-adapter needs --model: the model grafted with --adapter-inputs that serves it".into(),
                        )
                    })?;
                    let out = output.unwrap_or_else(|| {
                        adapter.with_extension(lora_graft::adapter::onnx_adapter::EXTENSION)
                    });
                    plan.write("output adapter", &out).check()?;
                    let file =
                        jobs::export::onnx_adapter(m, &loaded, adapter_version, model_version)?;
                    commit.write(&out, &file.to_bytes()?)?;
                    (format!("{} adapter inputs", file.parameters.len()), out)
                }
                ExportFormat::Peft => {
                    use lora_graft::adapter::peft::{CONFIG_NAME, WEIGHTS_NAME};
                    let out = output.unwrap_or_else(|| adapter.with_extension("peft"));
                    let (config, tensors) = jobs::export::peft_folder(&loaded, m.as_ref())?;
                    plan.write("PEFT tensors", &out.join(WEIGHTS_NAME))
                        .write("PEFT config", &out.join(CONFIG_NAME))
                        .check_creating_folder(&out)?;
                    let file = lora_graft::adapter::AdapterFile {
                        metadata: [("format".to_string(), "pt".to_string())].into(),
                        tensors: tensors.into_iter().collect(),
                    };
                    commit.write(&out.join(WEIGHTS_NAME), &file.to_bytes()?)?;
                    commit.write(&out.join(CONFIG_NAME), config.as_bytes())?;
                    ("a PEFT LoRA folder".to_string(), out)
                }
            };
            commit.commit()?;
            println!(
                "{what} of {} ({})",
                adapter.display(),
                loaded.req.variant.name()
            );
            println!("wrote {}", out.display());
        }
        Command::Pack {
            adapters,
            model,
            output,
            file,
        } => {
            let overrides = file.overrides()?;
            let loaded: Vec<LoadedAdapter> = adapters
                .iter()
                .map(|a| LoadedAdapter::read(a, &overrides))
                .collect::<Result<_>>()?;
            let m = Model::load(&model)?;
            let mut plan = OutputPlan::default().read_model(&m)?;
            for a in &adapters {
                plan = plan.read("adapter file", a);
            }
            plan.write("stacked adapters", &output).check()?;
            let tensors = jobs::export::pack(&m, &loaded)?;
            let slots: Vec<String> = adapters.iter().map(|a| a.display().to_string()).collect();
            let file = lora_graft::adapter::AdapterFile {
                metadata: [(
                    "lora_graft_slots".to_string(),
                    serde_json::to_string(&slots).expect("json"),
                )]
                .into(),
                tensors: tensors.into_iter().collect(),
            };
            let mut commit = Commit::new();
            commit.write(&output, &file.to_bytes()?)?;
            commit.commit()?;
            for (i, a) in adapters.iter().enumerate() {
                println!("slot {i}: {}", a.display());
            }
            println!("wrote {}", output.display());
        }
        Command::Targets {
            model,
            filters,
            json,
        } => {
            let path = model;
            let mut model = Model::load(&path)?;
            let filters = filters.filters()?;
            jobs::expose_fused_projections(&mut model, &filters)?;
            let targeting = target::run(&model.graph, &filters)
                .map_err(|e| e.context(format!("{}: targeting", path.display())))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&targeting).expect("serialisable")
                );
            } else {
                print!("{targeting}");
            }
        }
    }
    Ok(())
}

/// Keeps freed memory in the process instead of returning it to the kernel: every
/// training step allocates the same large activations again, and fresh pages from the
/// kernel cost a page fault each (11 % of a step's time on the training benchmark).
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any worker starts.
    unsafe {
        // 32 MiB: glibc's largest mmap threshold on 64-bit (it refuses more).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn graft(args: GraftArgs) -> Result<()> {
    let Some(input) = args.model else {
        return Err(Error::Usage(format!(
            "no model given; usage: lora-graft model.onnx --variant {} (see --help)",
            variant_names("|")
        )));
    };
    if let Some(adapter_in) = &args.adapter_in {
        let overrides = AdapterOverrides {
            variant: args.variant.variant,
            alpha: args.variant.alpha.as_deref().map(parse_alpha).transpose()?,
            strip_prefix: args.filters.strip_prefix.clone(),
            role_overrides: args.filters.filters()?.role_overrides,
        };
        let adapter = LoadedAdapter::read(adapter_in, &overrides)?;
        let out = args.output.unwrap_or_else(|| {
            jobs::default_paths(&input, adapter.req.variant.name(), None, None).0
        });
        let mut model = Model::load(&input)?;
        OutputPlan::default()
            .read_model(&model)?
            .read("adapter file", adapter_in)
            .write_model("output model", &model, &out)?
            .check()?;
        let outcome = jobs::apply(&mut model, &adapter)?;
        let report = model.save(&out, &SaveOptions::default())?;
        println!(
            "{} modules adapted with {} from {}",
            outcome.grafted.modules.len(),
            adapter.req.variant.name(),
            adapter_in.display()
        );
        print_saved(&report);
        return Ok(());
    }
    let mut req = args
        .variant
        .request(&args.filters)
        .map_err(|e| e.context(input.display().to_string()))?;
    req.adapter_slots = args.adapter_slots;
    req.calibration = args.variant.calibration.request(
        args.tokenizer.clone(),
        args.calibration_batch,
        args.calibration_seq,
        None,
        None,
    );
    req.adapter_inputs = args.adapter_inputs.then_some(if args.against_original {
        InputBase::Original
    } else {
        InputBase::Trained
    });
    let variant = req.variant.name();
    let (out, adapter_path) = jobs::default_paths(
        &input,
        variant,
        args.output.as_deref(),
        args.adapter.as_deref(),
    );
    let mut model = Model::load(&input)?;
    // Before the (long, for PiSSA on a large model) graft.
    OutputPlan::default()
        .read_model(&model)?
        .write_model("output model", &model, &out)?
        .write("adapter file", &adapter_path)
        .check()?;
    // Rewritten weights go to the output's data file as they are made.
    let mut commit = lora_graft::commit::Commit::new();
    let sink = model.data_sink(&out, &mut commit)?;
    let mut outcome = jobs::graft_writing_to(&mut model, &req, sink.as_ref())?;
    if !outcome.calibration_report.is_empty() {
        println!("{}", outcome.calibration_report);
    }
    if args.lower {
        let lowered = jobs::lower(&mut model, &mut outcome)?;
        let list: Vec<String> = lowered.iter().map(|(op, n)| format!("{op} x{n}")).collect();
        println!(
            "lowered {}",
            if list.is_empty() {
                "nothing (no fused op with a lowering)".into()
            } else {
                list.join(", ")
            }
        );
    }
    let adapter = outcome.adapter_file(&req);
    let report = jobs::write_staged(&model, &adapter, &out, &adapter_path, commit, sink.as_ref())?;
    let rank = if req.variant.uses_rank() {
        format!(" (r = {})", req.cfg.r)
    } else {
        String::new()
    };
    println!(
        "{} targets adapted with {variant}{rank}:",
        outcome.targeting.targets.len(),
    );
    for m in &outcome.grafted.modules {
        let roles: Vec<&str> = m.sites.iter().map(|s| s.role.as_str()).collect();
        println!(
            "  {:<48} {} -> {}  {}",
            m.module,
            m.dims.d_in,
            m.dims.d_out,
            roles.join(",")
        );
    }
    let trainable = outcome.grafted.trainable_params();
    let base = outcome.targeting.model_params.max(1);
    println!(
        "trainable parameters: {trainable} ({:.3}% of the base model's {base})",
        100.0 * trainable as f64 / base as f64
    );
    print_saved(&report);
    println!("wrote {}", adapter_path.display());
    Ok(())
}

/// Whether `path` is an `.onnx_adapter` file (by its file identifier).
fn is_onnx_adapter(path: &std::path::Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let mut file = lora_graft::files::open_regular(path)?;
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    Ok(OnnxAdapter::is_onnx_adapter(&head[..n]))
}

/// `inspect --json` of an `.onnx_adapter` file.
fn onnx_adapter_json(adapter: &OnnxAdapter) -> serde_json::Value {
    serde_json::json!({
        "format_version": lora_graft::adapter::onnx_adapter::FORMAT_VERSION,
        "adapter_version": adapter.adapter_version,
        "model_version": adapter.model_version,
        "parameters": adapter.parameters.iter().map(|(name, a)| serde_json::json!({
            "name": name,
            "dtype": lora_graft::dtype::name(a.elem_type()),
            "dims": a.shape(),
        })).collect::<Vec<_>>(),
    })
}

/// The CLI name of a loss.
fn loss_name(loss: Loss) -> String {
    use clap::ValueEnum;
    loss.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Says what a save wrote.
fn print_saved(report: &SaveReport) {
    println!("wrote {}", report.model.display());
    for p in &report.linked {
        println!(
            "  linked external data {} (the input's, not copied)",
            p.display()
        );
    }
    for p in &report.cloned {
        println!("  cloned external data {} (copy-on-write)", p.display());
    }
    for p in &report.copied {
        println!(
            "  copied external data {} (runtimes need it in the model's folder)",
            p.display()
        );
    }
    if let Some(p) = &report.own_data {
        println!("  new tensors in {}", p.display());
    }
}
