"""bench/seg_false_masks_by_exposure.py: the README's split of false masks, counted by hand."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("exposure", ROOT / "bench" / "seg_false_masks_by_exposure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_false_masks_are_split_by_a_copy_among_the_training_backgrounds(tmp_path):
    (tmp_path / "seg.csv").write_text(
        "path,found,x0,y0,x1,y1,area_px,score,model,status,error\n"
        "Te-no_0001.jpg,true,1,1,2,2,1,0.9,unet,ok,\n"     # a copy of a training background: seen
        "Te-no_0002.jpg,false,,,,,0,,unet,ok,\n"           # seen
        "Te-no_0003.jpg,true,1,1,2,2,1,0.9,unet,ok,\n"     # a copy of a validation background only: unseen
        "Te-no_0004.jpg,true,1,1,2,2,1,0.9,unet,ok,\n"     # no copy at all: unseen
        "Te-no_0005.jpg,,,,,,,,unet,error,unreadable\n")   # not counted
    (tmp_path / "split.csv").write_text("source,name,split\nbackground,background_Tr-no_0010,train\n"
                                        "background,background_Tr-no_0011,train\nbackground,background_Tr-no_0012,val\n"
                                        "figshare,figshare_1,train\n")
    (tmp_path / "dups.csv").write_text(
        "test_path,train_path,distance,same_label\n"
        "/d/Testing/notumor/Te-no_0001.jpg,/d/Training/notumor/Tr-no_0010.jpg,0,true\n"
        "/d/Testing/notumor/Te-no_0002.jpg,/d/Training/notumor/Tr-no_0099.jpg,0,true\n"
        "/d/Testing/notumor/Te-no_0002.jpg,/d/Training/notumor/Tr-no_0011.jpg,2,true\n"
        "/d/Testing/notumor/Te-no_0003.jpg,/d/Training/notumor/Tr-no_0012.jpg,0,true\n")
    out = _script().main(["--segments", str(tmp_path / "seg.csv"), "--split", str(tmp_path / "split.csv"),
                           "--duplicates", str(tmp_path / "dups.csv")])
    assert out["copy among its training backgrounds"] == {"slices": 2, "false_masks": 1, "rate": 0.5}
    assert out["no such copy"] == {"slices": 2, "false_masks": 2, "rate": 1.0}
    assert out["all"] == {"slices": 4, "false_masks": 3, "rate": 0.75}
