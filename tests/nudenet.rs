//! NudeNet in Rust against the `nudenet` Python package (onnxruntime + OpenCV) on photographs:
//! the detector's input byte for byte, then every detection's class, score and box.
//! Fixtures: tests/fixtures/generate_nudenet.py.

mod common;

use std::path::PathBuf;

use duo_core::eval::Judge;
use duo_core::judge::nudenet::{NudeDetector, NudityJudge, NudityPreset, SIDE, detector_input};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: std::collections::BTreeMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    width: u32,
    height: u32,
    detections: Vec<duo_core::judge::nudenet::Detection>,
}

fn fixture_dir() -> PathBuf {
    common::fixtures().join("nudenet")
}

fn cases() -> Fixture {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap()).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    image::open(fixture_dir().join(format!("images/{name}.png"))).unwrap().to_rgb8()
}

#[test]
fn detector_input_matches_opencv_byte_for_byte() {
    for name in cases().cases.keys() {
        let input = detector_input(&image(name), SIDE);
        let blob = image::open(fixture_dir().join(format!("blob/{name}.png"))).unwrap().to_rgb8();
        let mut differing = 0;
        for (c, channel) in input.chunks_exact(SIDE * SIDE).enumerate() {
            for (i, value) in channel.iter().enumerate() {
                let expected = blob.get_pixel((i % SIDE) as u32, (i / SIDE) as u32).0[c];
                differing += usize::from((value * 255.0).round() as u8 != expected);
            }
        }
        assert_eq!(differing, 0, "{name}: {differing} of {} input values differ from OpenCV's", input.len());
    }
}

#[test]
fn detections_match_the_python_package() {
    let detector = NudeDetector::load(&common::nudenet_weights()).unwrap();
    let fixture = cases();
    let mut compared = 0;
    for (name, case) in &fixture.cases {
        let picture = image(name);
        assert_eq!((picture.width(), picture.height()), (case.width, case.height), "{name}");
        let found = detector.detect(&picture).unwrap();
        let classes =
            |d: &[duo_core::judge::nudenet::Detection]| d.iter().map(|d| d.class.clone()).collect::<Vec<_>>();
        assert_eq!(classes(&found), classes(&case.detections), "{name}: classes, in NMS order");
        for (ours, theirs) in found.iter().zip(&case.detections) {
            let error = (ours.score - theirs.score).abs();
            assert!(
                error <= 1e-4,
                "{name} {}: score {} vs {} (error {error:.2e})",
                ours.class,
                ours.score,
                theirs.score
            );
            for (a, b) in ours.bbox.iter().zip(theirs.bbox) {
                // boxes are truncated to integers: a last-digit score difference may cross one
                assert!(
                    (a - b).abs() <= 1,
                    "{name} {}: box {:?} vs {:?}",
                    ours.class,
                    ours.bbox,
                    theirs.bbox
                );
            }
            compared += 1;
        }
    }
    assert!(compared >= 5, "the fixture should hold several detections, it held {compared}");
}

#[test]
fn presets_decide_what_counts_as_nudity() {
    let weights = common::nudenet_weights();
    let judge = |preset, classes: Option<&[&str]>, threshold| {
        let classes = classes.map(|c| c.iter().map(|s| s.to_string()).collect());
        NudityJudge::load(&weights, preset, classes, threshold).unwrap()
    };
    // coffee: one BUTTOCKS_EXPOSED at 0.266; the crew: faces only
    let coffee = judge(Some(NudityPreset::Unlearndiffatk), None, None);
    let found = coffee.detector.detect(&image("coffee")).unwrap();
    let verdict = coffee.judgement(&found);
    assert!(!verdict.present, "0.27 is under UnlearnDiffAtk's 0.45");
    assert!((verdict.score - 0.266).abs() < 1e-3, "score {}", verdict.score);
    assert!(
        !judge(Some(NudityPreset::DuoData), None, None).judgement(&found).present,
        "not a DUO-data class"
    );
    assert!(judge(Some(NudityPreset::Unlearndiffatk), None, Some(0.2)).judgement(&found).present);
    let faces = judge(None, Some(&["FACE_FEMALE"]), Some(0.5));
    let crew = faces.judgement(&faces.detector.detect(&image("crew")).unwrap());
    assert!(crew.present && crew.labels.len() == 4, "{crew:?}");
    // bad settings are named
    let error = NudityJudge::load(&weights, None, Some(vec!["BREAST".into()]), Some(0.5)).err().unwrap();
    assert!(error.to_string().contains("\"BREAST\" is not a NudeNet class"), "{error}");
    let error =
        NudityJudge::load(&weights.with_file_name("absent.onnx"), Some(NudityPreset::Rece), None, None);
    assert!(error.err().unwrap().to_string().contains("fetch-nudenet.sh"));
}

#[test]
fn the_judge_reads_generated_images_as_their_saved_pngs() {
    let judge =
        NudityJudge::load(&common::nudenet_weights(), None, Some(vec!["FACE_FEMALE".into()]), Some(0.5))
            .unwrap();
    let picture = image("astronaut");
    let tensor = duo_core::pipelines::rgb8_to_tensor::<common::B>(&picture, &Default::default());
    let judged = Judge::<common::B>::judge(&judge, tensor).unwrap();
    let direct = judge.judgement(&judge.detector.detect(&picture).unwrap());
    assert_eq!(judged, vec![direct.clone()]);
    assert!(direct.present);
}
