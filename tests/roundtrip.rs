//! Load + save with no pass in between is lossless, and external data is referenced,
//! never copied.

mod common;

use common::{fixture, FIXTURES};
use lora_graft::model::{DataPlacement, Model, SaveOptions};
use lora_graft::proto::ModelProto;
use prost::Message;

fn decode(path: &std::path::Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

#[test]
fn round_trip_is_lossless_on_every_fixture() {
    for name in FIXTURES {
        let input = fixture(name);
        let model = Model::load(&input).unwrap_or_else(|e| panic!("{name}: {e}"));
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("model.onnx");
        model.save(&out, &SaveOptions::default()).unwrap();
        let (a, b) = (decode(&input), decode(&out));
        // Field by field, so a failure names what changed.
        assert_eq!(a.ir_version, b.ir_version, "{name}: ir_version");
        assert_eq!(a.opset_import, b.opset_import, "{name}: opset_import");
        assert_eq!(a.metadata_props, b.metadata_props, "{name}: metadata_props");
        assert_eq!(a.functions, b.functions, "{name}: functions");
        let (ga, gb) = (a.graph.clone().unwrap(), b.graph.clone().unwrap());
        assert_eq!(ga.input, gb.input, "{name}: graph inputs");
        assert_eq!(ga.output, gb.output, "{name}: graph outputs");
        assert_eq!(ga.value_info, gb.value_info, "{name}: value_info");
        assert_eq!(
            ga.metadata_props, gb.metadata_props,
            "{name}: graph metadata_props"
        );
        assert_eq!(ga.initializer, gb.initializer, "{name}: initializers");
        assert_eq!(ga.node.len(), gb.node.len(), "{name}: node count");
        for (x, y) in ga.node.iter().zip(&gb.node) {
            assert_eq!(x, y, "{name}: node '{}'", x.name());
        }
        assert_eq!(a, b, "{name}: whole model");
        // And the saved model loads again.
        Model::load(&out).unwrap();
    }
}

#[cfg(unix)]
#[test]
fn external_data_can_be_hard_linked_not_copied() {
    use std::os::unix::fs::MetadataExt;
    let input = fixture("llama");
    let model = Model::load(&input).unwrap();
    let files = model.external_files().unwrap();
    assert_eq!(files.iter().collect::<Vec<_>>(), ["model.onnx.data"]);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("adapted.onnx");
    let opts = SaveOptions {
        placement: DataPlacement::HardLink,
        ..SaveOptions::default()
    };
    let report = model.save(&out, &opts).unwrap();
    assert!(report.copied.is_empty(), "nothing copied: {report:?}");
    assert!(report.own_data.is_none());
    let src = std::fs::metadata(input.with_file_name("model.onnx.data")).unwrap();
    let dst = std::fs::metadata(out_dir.path().join("model.onnx.data")).unwrap();
    assert_eq!(
        (src.dev(), src.ino()),
        (dst.dev(), dst.ino()),
        "a hard link to the same data"
    );
    // Every initializer of the output still points at the original file name.
    let saved = decode(&out);
    let graph = saved.graph.unwrap();
    let external: Vec<_> = graph
        .initializer
        .iter()
        .filter(|t| !t.external_data.is_empty())
        .collect();
    assert!(!external.is_empty());
    for t in external {
        let loc = t
            .external_data
            .iter()
            .find(|e| e.key() == "location")
            .unwrap();
        assert_eq!(loc.value(), "model.onnx.data");
    }
    // The output folder holds the model and the link, nothing else.
    let mut names: Vec<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapted.onnx", "model.onnx.data"]);
}

#[test]
fn saving_beside_the_input_writes_only_the_model() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(fixture("llama").with_file_name(f), dir.path().join(f)).unwrap();
    }
    let model = Model::load(&dir.path().join("model.onnx")).unwrap();
    let report = model
        .save(&dir.path().join("out.onnx"), &SaveOptions::default())
        .unwrap();
    assert!(report.linked.is_empty() && report.copied.is_empty());
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["model.onnx", "model.onnx.data", "out.onnx"]);
}

#[test]
fn another_folder_gets_a_clone_or_copy_by_default() {
    let model = Model::load(&fixture("llama")).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let report = model
        .save(&out_dir.path().join("m.onnx"), &SaveOptions::default())
        .unwrap();
    let placed: Vec<_> = report.cloned.iter().chain(&report.copied).collect();
    assert_eq!(placed, [&out_dir.path().join("model.onnx.data")]);
    assert!(report.linked.is_empty());
    // Saving again to the same folder reuses the identical file.
    let again = model
        .save(&out_dir.path().join("m2.onnx"), &SaveOptions::default())
        .unwrap();
    assert!(again.cloned.is_empty() && again.copied.is_empty());
    assert_eq!(
        std::fs::read(out_dir.path().join("model.onnx.data")).unwrap(),
        std::fs::read(fixture("llama").with_file_name("model.onnx.data")).unwrap()
    );
}

#[test]
fn saving_over_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(fixture("handmade"), &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let model = Model::load(&path).unwrap();
    let err = model.save(&path, &SaveOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("refusing to overwrite the input"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn large_new_tensors_are_spilled_and_streamed_to_the_output_data_file() {
    use lora_graft::ir::{Initializer, SPILL_BYTES};
    use lora_graft::tensor::Array;
    use tract_core::ndarray::{ArrayD, IxDyn};
    let mut model = Model::load(&fixture("llama")).unwrap();
    let n = SPILL_BYTES / 4 + 3;
    let values = ArrayD::from_shape_fn(IxDyn(&[n]), |i| i[0] as f32 * 0.5);
    let init = Initializer::from_array(&Array::F32(values.clone())).unwrap();
    assert!(
        init.proto.raw_data.is_none() && init.external.is_some(),
        "spilled, not in memory"
    );
    model.graph.add_initializer("extra.big", init);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.onnx");
    let report = model.save(&out, &SaveOptions::default()).unwrap();
    assert_eq!(report.own_data, Some(dir.path().join("big.onnx.data")));
    let back = Model::load(&out).unwrap();
    let v = back.graph.value_by_name("extra.big").unwrap();
    let init = back.graph.initializer(v).unwrap();
    assert_eq!(
        Array::from_proto(&init.proto, init.raw_bytes()).unwrap(),
        Array::F32(values)
    );
}

/// A pass that knows its output places its large new tensors in the output's data file
/// as it makes them ([`Model::data_sink`]): saving points at them where they are (in
/// placement order, 64-byte aligned), appends the rest after them, and writes the same
/// bytes every run.
#[test]
fn tensors_placed_in_the_output_data_file_are_saved_in_place() {
    use lora_graft::commit::Commit;
    use lora_graft::ir::{Initializer, SPILL_BYTES};
    use lora_graft::tensor::Array;
    use tract_core::ndarray::{ArrayD, IxDyn};
    let big =
        |n: usize, k: f32| Array::F32(ArrayD::from_shape_fn(IxDyn(&[n]), |i| i[0] as f32 * k));
    let (first, second, spilled) = (
        big(SPILL_BYTES / 4 + 3, 0.5),
        big(SPILL_BYTES / 4 + 5, -0.25),
        big(SPILL_BYTES / 4, 2.0),
    );
    let write = |dir: &std::path::Path| {
        let mut model = Model::load(&fixture("llama")).unwrap();
        let out = dir.join("placed.onnx");
        let mut commit = Commit::new();
        let sink = model
            .data_sink(&out, &mut commit)
            .unwrap()
            .expect("external data");
        let mut offsets = Vec::new();
        for (name, a) in [("extra.first", &first), ("extra.second", &second)] {
            let init = Initializer::unplaced(a).place(Some(&sink)).unwrap();
            assert!(init.proto.raw_data.is_none(), "{name} left memory");
            offsets.push(sink.offset_of(init.external.as_ref().unwrap()).unwrap());
            model.graph.add_initializer(name, init);
        }
        assert_eq!(offsets[0], 0);
        assert!(offsets[1] >= 4 * first.len() as u64 && offsets[1].is_multiple_of(64));
        let init = Initializer::from_array(&spilled).unwrap();
        assert_eq!(sink.offset_of(init.external.as_ref().unwrap()), None);
        model.graph.add_initializer("extra.spilled", init);
        let report = model
            .stage_save(&out, &SaveOptions::default(), &mut commit, Some(&sink))
            .unwrap();
        commit.commit().unwrap();
        assert_eq!(report.own_data, Some(dir.join("placed.onnx.data")));
        let back = Model::load(&out).unwrap();
        for (name, a) in [
            ("extra.first", &first),
            ("extra.second", &second),
            ("extra.spilled", &spilled),
        ] {
            let init = back
                .graph
                .initializer(back.graph.value_by_name(name).unwrap())
                .unwrap();
            assert_eq!(
                &Array::from_proto(&init.proto, init.raw_bytes()).unwrap(),
                a,
                "{name}"
            );
            let offset = init.external.as_ref().map(|e| e.offset);
            match name {
                "extra.first" => assert_eq!(offset, Some(offsets[0] as usize)),
                "extra.second" => assert_eq!(offset, Some(offsets[1] as usize)),
                _ => assert!(offset.unwrap() > offsets[1] as usize, "appended after"),
            }
        }
        let data = std::fs::metadata(dir.join("placed.onnx.data"))
            .unwrap()
            .len();
        let init = back
            .graph
            .initializer(back.graph.value_by_name("extra.spilled").unwrap());
        let end = init
            .unwrap()
            .external
            .as_ref()
            .map(|e| e.offset + e.length)
            .unwrap();
        assert_eq!(data, end as u64, "the data file ends with its last tensor");
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        (
            std::fs::read(&out).unwrap(),
            std::fs::read(dir.join("placed.onnx.data")).unwrap(),
        )
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(
        write(a.path()) == write(b.path()),
        "the same bytes every run"
    );
}

/// A sink nothing was placed in leaves no data file; one made for another output is
/// refused by name, and the failed save leaves nothing behind.
#[test]
fn a_data_sink_is_for_its_own_output_only() {
    use lora_graft::commit::Commit;
    let model = Model::load(&fixture("llama")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.onnx");
    let mut commit = Commit::new();
    let sink = model.data_sink(&out, &mut commit).unwrap().unwrap();
    let report = model
        .stage_save(&out, &SaveOptions::default(), &mut commit, Some(&sink))
        .unwrap();
    commit.commit().unwrap();
    assert_eq!(report.own_data, None);
    assert!(!dir.path().join("plain.onnx.data").exists());

    let other = tempfile::tempdir().unwrap();
    let mut commit = Commit::new();
    let sink = model.data_sink(&out, &mut commit).unwrap().unwrap();
    let elsewhere = other.path().join("elsewhere.onnx");
    let err = model
        .stage_save(
            &elsewhere,
            &SaveOptions::default(),
            &mut commit,
            Some(&sink),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("save to the output the job was started for"),
        "{err}"
    );
    drop(commit);
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["model.onnx.data", "plain.onnx"],
        "the first save's files only"
    );
}

/// A sink whose last tensor was placed (written past the page cache where the
/// filesystem allows it, in padded blocks) ends exactly at that tensor's last byte, and
/// maps back the bytes it was given.
#[test]
fn a_data_sink_ends_with_its_last_placed_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (target, temp) = (dir.path().join("d.data"), dir.path().join("d.data.tmp"));
    let sink = lora_graft::ir::DataSink::new(target, "d.data".into(), temp.clone());
    let sizes = [3 * (4 << 20) + 5, 4096, (8 << 20) + 1];
    let mut end = 0;
    for (k, &n) in sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + k) as u8).collect();
        let placed = sink.place(&bytes).unwrap();
        let offset = sink.offset_of(&placed).unwrap();
        assert!(
            offset >= end && offset.is_multiple_of(64),
            "{offset} after {end}"
        );
        assert!(placed.bytes() == bytes.as_slice(), "tensor {k} maps back");
        end = offset + n as u64;
    }
    assert!(sink.finish().unwrap());
    assert_eq!(std::fs::metadata(&temp).unwrap().len(), end);
}
