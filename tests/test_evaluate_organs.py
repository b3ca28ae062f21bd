"""Organ labels transferred from DL_info rows to volumetric truths."""

from __future__ import annotations

import numpy as np

from uld_jax.evaluate.organs import organ_labels_from_dl_info
from uld_jax.io.safe_pickle import safe_load

HEADER = ("File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
          "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
          "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test,Nifti_ct_name")


def _row(key, box, ctype, name):
    return (f'x.png,1,1,1,{key},"0, 0, 0, 0, 0, 0, 0, 0","{box}","1, 1","0, 0, 0",{ctype},0,"1, 9",'
            f'"1, 1, 1","512, 512","-175, 275",F,50,3,{name}.nii.gz')


def test_hand_case(tmp_path):
    truth = {"000001_01_01_001-009": np.array([[10, 10, 2, 29, 29, 5], [100, 100, 3, 119, 119, 4],
                                               [200, 200, 1, 219, 219, 9]], float)}
    csv = tmp_path / "dl.csv"
    csv.write_text("\n".join([HEADER,
                              _row(4, "11, 11, 30, 30", 5, "000001_01_01_001-009"),      # -> truth 0: lung
                              _row(6, "101, 101, 120, 120", 4, "000001_01_01_001-009"),  # slice 6 outside truth 1
                              _row(5, "201, 201, 220, 220", 3, "000001_01_01_001-009"),  # -> truth 2: lymph node
                              _row(5, "1, 1, 5, 5", 4, "000009_01_01_001-009")]) + "\n")  # other sub-volume
    labels, stats = organ_labels_from_dl_info(truth, csv)
    assert labels == {"000001_01_01_001-009": ["lung", "unknown", "lymph_node"]}
    assert stats == {"rows": 3, "matched": 2, "truths": 3}


def test_real_1k_test_split(real_data):
    truth = safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")["test"]
    labels, stats = organ_labels_from_dl_info(truth, real_data / "deeplesion" / "DL_info_test_split.csv")
    assert stats["rows"] == 1212 and stats["truths"] == 4155
    assert stats["matched"] == 1008
    flat = [x for v in labels.values() for x in v]
    assert (flat.count("lung"), flat.count("liver"), flat.count("lymph_node")) == (215, 178, 144)
