"""The MRML bridge on a real vtkMRMLScene (slicer-core) with real CT: geometry, output nodes, display, reuse,
and a scene left untouched by cancelled or failing runs. Slicer's own reader is the reference for geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from conftest import ijk_to_ras, new_scene, read_with_slicer, same_grid
from vtkmodules.util import numpy_support
from vtkmodules.util.misc import calldata_type
from vtkmodules.util.vtkConstants import VTK_OBJECT
from vtkmodules.vtkCommonCore import reference
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkImagingCore import vtkExtractVOI

from AttentionUNetSegLib import geometry, mrml_bridge
from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
from AttentionUNetSegLib.errors import Cancelled, UserError
from AttentionUNetSegLib.imageio import PANCREAS_SEGMENT, read_image

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
BRIGHT_INDEX = (17, 63, 21)  # (i, j, k) inside the 122x101x30 crop
BRIGHT_HU = 5000.0


def rotation(axis, degrees: float) -> np.ndarray:
    return np.array(sitk.VersorTransform(tuple(axis), np.radians(degrees)).GetMatrix()).reshape(3, 3)


DIRECTIONS = {  # LPS direction matrices as file headers carry them
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # the crop's own header (RAS-stored)
    "flipped-permuted": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
    "oblique": rotation((1, 1, 0.5), 25) @ np.diag([1.0, -1.0, 1.0]),
}


# --- helpers -------------------------------------------------------------------------------------------


def voxels(image_data) -> np.ndarray:
    """(k, j, i) array of a vtkImageData."""
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return array.reshape(image_data.GetDimensions()[::-1])


def same_physical_voxels(image: sitk.Image, reference: sitk.Image) -> bool:
    """Same voxels at the same physical places, whatever the order the two store them in."""
    low, high = geometry.physical_bounds(image)
    reference_low, reference_high = geometry.physical_bounds(reference)
    on_image_grid = geometry.resample_like(reference, image, sitk.sitkNearestNeighbor, np.nan)
    return (
        np.allclose(low, reference_low, atol=1e-3)
        and np.allclose(high, reference_high, atol=1e-3)
        and np.allclose(image.GetSpacing(), sorted(reference.GetSpacing(), key=image.GetSpacing().index))
        and np.array_equal(sitk.GetArrayViewFromImage(on_image_grid), sitk.GetArrayViewFromImage(image))
    )


def brightest_ras(node) -> np.ndarray:
    """RAS point of the brightest voxel of a volume node, by its IJK-to-RAS."""
    k, j, i = np.unravel_index(np.argmax(voxels(node.GetImageData())), voxels(node.GetImageData()).shape)
    return (ijk_to_ras(node) @ np.array([i, j, k, 1.0]))[:3]


def ras_bounds(node) -> np.ndarray:
    """Lowest and highest RAS coordinates of the voxel centres of a volume node."""
    corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners[:, :3] *= np.array(node.GetImageData().GetDimensions()) - 1
    ras = (ijk_to_ras(node) @ corners.T).T[:, :3]
    return np.array([ras.min(axis=0), ras.max(axis=0)])


def with_header(ct: sitk.Image, direction: np.ndarray) -> sitk.Image:
    """The real CT voxels, a bright voxel added, stored under another direction (the origin kept)."""
    array = sitk.GetArrayFromImage(ct)
    array[BRIGHT_INDEX[::-1]] = BRIGHT_HU
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(ct.GetSpacing())
    image.SetOrigin(ct.GetOrigin())
    image.SetDirection(direction.ravel().tolist())
    return image


def oriented_labelmap(mask: sitk.Image):
    """A mask as Slicer's segment labelmap (voxels placed by their IJK-to-RAS)."""
    node = mrml_bridge.image_to_volume_node(mask, slicer.vtkMRMLScene(), "labels")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(node.GetImageData())
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    labelmap.SetImageToWorldMatrix(matrix)
    return labelmap


def terminology(segment) -> str:
    """A segment's terminology as Slicer 5.8 can read it (``GetTerminology()`` came in 5.10)."""
    value = reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), value), "the segment has no terminology"
    return value.get()


class Slicer58Segment(slicer.vtkSegment):
    """vtkSegment as Slicer 5.8 has it (v5.8.1 Libs/vtkSegmentationCore/vtkSegment.h): the terminology
    convenience methods came in 5.10 (commit 49a251067d); slicer-core, built from 5.11, has them."""

    def __getattribute__(self, name):
        if name in ("GetTerminology", "SetTerminology", "HasTerminology"):
            raise AttributeError(f"'vtkSegment' object has no attribute '{name}'")
        return super().__getattribute__(name)


def scene_state(scene) -> list[tuple[str, int]]:
    """Every node with its modification time: equal states mean nothing was added, removed or changed."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetMTime()) for node in nodes]


def nodes_of_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def merged_labelmap(segmentation_node):
    """The segmentation as voxels on its reference geometry (Slicer's own export path)."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GenerateMergedLabelmapForAllSegments(labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    world = vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(world)
    matrix = np.array([[world.GetElement(r, c) for c in range(4)] for r in range(4)])
    return voxels(labelmap), matrix, labelmap.GetExtent()


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(small_ct) -> sitk.Image:
    return read_image(small_ct)


@pytest.fixture(scope="module")
def pancreas_label(small_ct) -> sitk.Image:
    return sitk.ReadImage(str(small_ct.parent / "pancreas.nii.gz"))


@pytest.fixture(scope="module")
def segmenter(tiny_model) -> Segmenter:
    return Segmenter(tiny_model, SegmentationOptions(device="cpu"))


@pytest.fixture(scope="module")
def labelled(small_ct, pancreas_label):
    """The real TotalSegmentator pancreas label imported for the CT that Slicer read."""
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    outputs = mrml_bridge.import_result(scene, ct_node, pancreas_label, {})
    return scene, ct_node, outputs


@pytest.fixture(scope="module")
def run(small_ct, segmenter):
    """One headless run (tiny untrained model) on the CT that Slicer read, three attention maps asked for."""
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    reports = []
    outputs, result = mrml_bridge.segment_volume_node(
        scene,
        ct_node,
        segmenter,
        progress=lambda fraction, text: reports.append(fraction),
        attention_names=("combined", "level3"),
    )
    return scene, ct_node, outputs, result, reports


# --- geometry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS, ids=list(DIRECTIONS))
def test_volume_node_to_image_places_voxels_as_itk_does(tmp_path, ct, direction):
    reference = with_header(ct, DIRECTIONS[direction])
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(reference, str(path))
    node = read_with_slicer(new_scene(), path)

    image = mrml_bridge.volume_node_to_image(node)

    assert image.GetPixelID() == reference.GetPixelID(), "the voxels keep their own type"
    assert same_physical_voxels(image, reference)
    # The bright voxel Slicer puts at RAS point r is, in the image, at the LPS point (-r_x, -r_y, r_z),
    # which is where ITK put it.
    lps = LPS_TO_RAS @ brightest_ras(node)
    assert np.allclose(lps, reference.TransformIndexToPhysicalPoint(BRIGHT_INDEX), atol=1e-3)
    assert image[image.TransformPhysicalPointToIndex(lps.tolist())] == BRIGHT_HU


@pytest.mark.parametrize("direction", DIRECTIONS, ids=list(DIRECTIONS))
def test_image_to_volume_node_places_voxels_as_slicer_reader_does(tmp_path, ct, direction):
    image = with_header(ct, DIRECTIONS[direction])
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    scene = new_scene()
    read_by_slicer = read_with_slicer(scene, path)

    node = mrml_bridge.image_to_volume_node(image, scene, "from image")

    assert scene.GetNodeByID(node.GetID()) is node and node.GetName() == "from image"
    assert node.GetDisplayNode() is not None
    assert np.allclose(brightest_ras(node), brightest_ras(read_by_slicer), atol=1e-3)
    assert np.allclose(ras_bounds(node), ras_bounds(read_by_slicer), atol=1e-3)
    back = mrml_bridge.volume_node_to_image(node)  # our own round trip keeps the voxel order too
    assert same_grid(back, image)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_image_to_volume_node_updates_a_given_node(ct):
    scene = new_scene()
    node = mrml_bridge.image_to_volume_node(ct, scene, "first")
    count = scene.GetNumberOfNodes()
    moved = sitk.Image(ct)
    moved.SetOrigin((0.0, 0.0, 0.0))

    again = mrml_bridge.image_to_volume_node(moved, scene, "second", node=node)

    assert again is node and scene.GetNumberOfNodes() == count and node.GetName() == "second"
    assert np.allclose(ijk_to_ras(node)[:3, 3], 0.0)


def test_dicom_series_read_by_slicer_equals_imageio(dicom_dir):
    """Anisotropic (0.98 x 0.98 x 2 mm) DICOM: Slicer's reader and ours agree voxel for voxel."""
    node = read_with_slicer(new_scene(), sorted(p for p in dicom_dir.iterdir() if p.is_file()))
    reference = read_image(dicom_dir)

    image = mrml_bridge.volume_node_to_image(node)

    assert same_grid(image, reference)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


def test_volume_whose_indices_do_not_start_at_zero(ct):
    """A vtkImageData extent starting above 0 (cropped in place) still lands where IJK-to-RAS says."""
    node = mrml_bridge.image_to_volume_node(ct, new_scene(), "CT")
    extract = vtkExtractVOI()
    extract.SetInputData(node.GetImageData())
    extract.SetVOI(10, 40, 20, 50, 5, 15)
    extract.Update()
    node.SetAndObserveImageData(extract.GetOutput())

    image = mrml_bridge.volume_node_to_image(node)

    assert image.GetSize() == (31, 31, 11)
    assert np.allclose(image.GetOrigin(), ct.TransformIndexToPhysicalPoint((10, 20, 5)))
    assert image[0, 0, 0] == ct[10, 20, 5]


def test_volume_without_voxels_is_a_user_error():
    scene = new_scene()
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName("empty")
    scene.AddNode(empty)
    with pytest.raises(UserError, match="empty has no voxels"):
        mrml_bridge.volume_node_to_image(empty)


def test_multi_component_volume_is_a_user_error(ct):
    scene = new_scene()
    rgb = sitk.Compose([sitk.Cast(ct, sitk.sitkFloat32)] * 3)
    node = slicer.vtkMRMLVectorVolumeNode()
    node.SetName("colour")
    scene.AddNode(node)
    image_data = vtkImageData()
    image_data.SetDimensions(rgb.GetSize())
    array = sitk.GetArrayViewFromImage(rgb).reshape(-1, 3)
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array, deep=True))
    node.SetAndObserveImageData(image_data)
    with pytest.raises(UserError, match="several components"):
        mrml_bridge.volume_node_to_image(node)


# --- segmentation node ---------------------------------------------------------------------------------


def test_segmentation_holds_one_pancreas_segment_with_standard_terminology(labelled):
    scene, _, outputs = labelled
    node = outputs.segmentation_node
    segmentation = node.GetSegmentation()

    assert scene.GetNodeByID(node.GetID()) is node and node.GetName() == "CT segmentation"
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Pancreas"
    assert np.allclose(np.array(segment.GetColor()) * 255, (249, 180, 111))
    assert terminology(segment) == PANCREAS_SEGMENT["terminology"]
    context, category, kind, *_ = terminology(segment).split("~")
    assert (category, kind) == ("SCT^123037004^Anatomical Structure", "SCT^15776009^Pancreas")
    assert context.startswith("Segmentation category and type")
    assert node.GetDisplayNode() is not None


def test_segment_voxels_equal_the_mask_on_the_input_geometry(labelled, pancreas_label):
    _, ct_node, outputs = labelled
    node = outputs.segmentation_node
    role = node.GetReferenceImageGeometryReferenceRole()
    assert node.GetNodeReferenceID(role) == ct_node.GetID()

    labels, image_to_world, extent = merged_labelmap(node)

    assert np.allclose(image_to_world, ijk_to_ras(ct_node), atol=1e-4)
    assert extent == ct_node.GetImageData().GetExtent()
    mask = sitk.GetArrayViewFromImage(pancreas_label) > 0
    assert mask.sum() > 100
    assert np.array_equal(labels > 0, mask)


def test_closed_surface_wraps_the_mask(labelled, pancreas_label):
    outputs = labelled[2]
    segment = outputs.segmentation_node.GetSegmentation().GetSegment("Pancreas")
    surface = segment.GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 100

    indices = np.argwhere(sitk.GetArrayViewFromImage(pancreas_label) > 0)[:, ::-1]  # (i, j, k)
    ras = np.array([LPS_TO_RAS @ pancreas_label.TransformIndexToPhysicalPoint(idx.tolist()) for idx in indices])
    surface_bounds = np.array(surface.GetBounds()).reshape(3, 2)
    voxel = max(pancreas_label.GetSpacing())
    assert np.allclose(surface_bounds[:, 0], ras.min(axis=0), atol=voxel)
    assert np.allclose(surface_bounds[:, 1], ras.max(axis=0), atol=voxel)


def test_user_chosen_segmentation_keeps_its_other_segments(small_ct, pancreas_label):
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    chosen = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(chosen)
    chosen.CreateDefaultDisplayNodes()
    organs = sitk.ReadImage(str(small_ct.parent / "organs.nii.gz"))  # TotalSegmentator v2: 5 = liver
    liver = slicer.vtkSegment()
    liver.SetName("Liver")
    liver.AddRepresentation("Binary labelmap", oriented_labelmap(organs == 5))
    assert chosen.GetSegmentation().AddSegment(liver, "Liver")

    for _ in range(2):
        outputs = mrml_bridge.import_result(scene, ct_node, pancreas_label, {}, segmentation_node=chosen)

    assert outputs.segmentation_node is chosen
    segmentation = chosen.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Liver", "Pancreas"]
    surface = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Pancreas")).GetRepresentation(
        "Closed surface"
    )
    assert surface is not None and surface.GetNumberOfPoints() > 100
    assert len(nodes_of_class(scene, "vtkMRMLSegmentationNode")) == 1


def test_a_rerun_into_a_pancreas_segment_needs_only_slicer_5_8s_segment_api(small_ct, pancreas_label,
                                                                            monkeypatch):
    monkeypatch.setattr(slicer, "vtkSegment", Slicer58Segment)
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    first = mrml_bridge.import_result(scene, ct_node, pancreas_label, {}, closed_surface=False)
    segment = first.segmentation_node.GetSegmentation().GetSegment("Pancreas")
    with pytest.raises(AttributeError):
        segment.GetTerminology()  # the stand-in is in use
    segment.SetTag(segment.GetTerminologyEntryTagName(), "edited by the user")

    again = mrml_bridge.import_result(scene, ct_node, pancreas_label, {}, closed_surface=False)

    assert again.segmentation_node is first.segmentation_node
    assert again.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    assert terminology(segment) == PANCREAS_SEGMENT["terminology"]


# --- attention nodes -----------------------------------------------------------------------------------


def test_attention_nodes_hold_the_maps_on_the_input_grid(run):
    scene, ct_node, outputs, result, _ = run
    assert set(outputs.attention_nodes) == {"combined", "level3"}
    for name, node in outputs.attention_nodes.items():
        assert scene.GetNodeByID(node.GetID()) is node
        assert node.GetName() == f"CT attention {name}"
        assert np.allclose(ijk_to_ras(node), ijk_to_ras(ct_node))
        values = voxels(node.GetImageData())
        assert values.shape == voxels(ct_node.GetImageData()).shape
        assert values.dtype == np.uint8 and values.max() > values.min()
        assert np.array_equal(values, sitk.GetArrayViewFromImage(result.attention_maps[name]))


def test_attention_display_is_a_heat_map_over_the_8_bit_range_with_low_values_transparent(run):
    scene, _, outputs, _, _ = run
    display = outputs.attention_nodes["combined"].GetDisplayNode()
    colour = scene.GetNodeByID(display.GetColorNodeID())
    assert colour is not None and colour.IsA("vtkMRMLPETProceduralColorNode")
    assert colour.GetType() == slicer.vtkMRMLPETProceduralColorNode.PETheat
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 255.0)
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(mrml_bridge.ATTENTION_LOWER_THRESHOLD * 255)
    assert 0.0 < display.GetLowerThreshold() < display.GetUpperThreshold() == 255.0
    # One colour node serves every map.
    assert len(nodes_of_class(scene, "vtkMRMLColorNode")) == 1


def test_combined_map_is_the_foreground_over_the_input_in_every_slice_view(run):
    scene, ct_node, outputs, _, _ = run
    composites = nodes_of_class(scene, "vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetForegroundVolumeID() == outputs.attention_nodes["combined"].GetID()
        assert composite.GetBackgroundVolumeID() == ct_node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(mrml_bridge.DEFAULT_ATTENTION_OPACITY)


def test_segmentation_of_a_run_matches_its_mask(run):
    _, ct_node, outputs, result, _ = run
    labels, image_to_world, _ = merged_labelmap(outputs.segmentation_node)
    assert np.allclose(image_to_world, ijk_to_ras(ct_node), atol=1e-4)
    assert np.array_equal(labels > 0, sitk.GetArrayViewFromImage(result.mask) > 0)


def test_progress_reaches_one_in_order(run):
    reports = run[4]
    assert reports[-1] == 1.0 and reports == sorted(reports)


def test_show_attention_switches_maps_and_hides(small_ct, segmenter):
    scene = new_scene(("Red", "Yellow", "Green"))
    ct_node = read_with_slicer(scene, small_ct)
    outputs, _ = mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=("combined", "level4"))
    level4 = outputs.attention_nodes["level4"]

    mrml_bridge.show_attention(scene, level4, opacity=0.3)
    for composite in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        assert composite.GetForegroundVolumeID() == level4.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.3)

    mrml_bridge.show_attention(scene, level4, visible=False)
    assert all(c.GetForegroundVolumeID() is None for c in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"))
    with pytest.raises(ValueError, match="opacity"):
        mrml_bridge.show_attention(scene, level4, opacity=1.5)


def test_scene_with_slicer_colour_nodes_uses_its_heat_map(small_ct, pancreas_label, ct):
    scene = new_scene()
    colour_logic = slicer.vtkMRMLColorLogic()
    colour_logic.SetMRMLScene(scene)  # adds Slicer's default colour nodes, as the application does
    colour_count = len(nodes_of_class(scene, "vtkMRMLColorNode"))
    ct_node = read_with_slicer(scene, small_ct)

    outputs = mrml_bridge.import_result(
        scene, ct_node, pancreas_label, {"combined": sitk.Cast(ct > 0, sitk.sitkUInt8) * 255}
    )

    assert len(nodes_of_class(scene, "vtkMRMLColorNode")) == colour_count
    display = outputs.attention_nodes["combined"].GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    colour_logic.SetMRMLScene(None)


# --- reuse, transforms, failures -----------------------------------------------------------------------


def test_second_run_updates_the_outputs_of_the_first(small_ct, segmenter):
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    names = ("combined", "level2")
    first, first_result = mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=names)
    ids = [node_id for node_id, _ in scene_state(scene)]
    # Change the CT (air over its left half) so that the second run has something new to write.
    array = voxels(ct_node.GetImageData())
    array[:, :, : array.shape[2] // 2] = -1024
    ct_node.GetImageData().Modified()

    second, second_result = mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=names)

    assert [node_id for node_id, _ in scene_state(scene)] == ids
    assert second.segmentation_node is first.segmentation_node
    assert all(second.attention_nodes[n] is first.attention_nodes[n] for n in names)
    combined = voxels(second.attention_nodes["combined"].GetImageData())
    assert np.array_equal(combined, sitk.GetArrayViewFromImage(second_result.attention_maps["combined"]))
    assert not np.array_equal(combined, sitk.GetArrayViewFromImage(first_result.attention_maps["combined"]))
    assert second.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1

    # Another input gets its own outputs, and shares the colour map.
    other = read_with_slicer(scene, small_ct, name="CT 2")
    third, _ = mrml_bridge.segment_volume_node(scene, other, segmenter, attention_names=names)
    assert third.segmentation_node is not first.segmentation_node
    assert third.attention_nodes["combined"].GetName() == "CT 2 attention combined"
    assert len(nodes_of_class(scene, "vtkMRMLSegmentationNode")) == 2
    assert len(nodes_of_class(scene, "vtkMRMLColorNode")) == 1


def give_added_nodes_top_level_items(scene) -> None:
    """What Slicer's subject hierarchy logic does and bare MRML does not: every added volume or segmentation
    gets an item at the scene's top level."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)

    @calldata_type(VTK_OBJECT)
    def on_node_added(caller, event, node):
        if node.IsA("vtkMRMLDisplayableNode") and not hierarchy.GetItemByDataNode(node):
            hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)

    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, on_node_added)


@pytest.mark.parametrize("like_slicer", [True, False], ids=["slicer-items", "bare-mrml"])
def test_outputs_sit_in_the_inputs_study_and_stay_where_the_user_moves_them(small_ct, segmenter, like_slicer):
    scene = new_scene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if like_slicer:
        give_added_nodes_top_level_items(scene)
    ct_node = read_with_slicer(scene, small_ct)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    if like_slicer:
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(ct_node), study)
    else:
        hierarchy.CreateItem(study, ct_node)

    def parent_of(node):
        return hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))

    outputs, _ = mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=("combined",))
    assert parent_of(outputs.segmentation_node) == study
    assert parent_of(outputs.attention_nodes["combined"]) == study

    reviewed = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Reviewed")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(outputs.segmentation_node), reviewed)
    again, _ = mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=("combined",))
    assert again.segmentation_node is outputs.segmentation_node
    assert parent_of(again.segmentation_node) == reviewed


def test_outputs_follow_the_parent_transform_of_the_input(abdomen_ct):
    scene = new_scene()
    ct_node = read_with_slicer(scene, abdomen_ct)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    shift = vtkMatrix4x4()
    shift.SetElement(0, 3, 40.0)
    transform.SetMatrixTransformToParent(shift)
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    label = sitk.ReadImage(str(abdomen_ct.parent / "pancreas.nii.gz"))

    image = mrml_bridge.volume_node_to_image(ct_node)
    outputs = mrml_bridge.import_result(scene, ct_node, label, {"combined": sitk.Cast(label, sitk.sitkUInt8)})

    assert same_grid(image, sitk.ReadImage(str(abdomen_ct)))  # the node's own frame, not the shifted world
    assert outputs.segmentation_node.GetTransformNodeID() == transform.GetID()
    assert outputs.attention_nodes["combined"].GetTransformNodeID() == transform.GetID()
    labels, _, _ = merged_labelmap(outputs.segmentation_node)
    assert np.array_equal(labels > 0, sitk.GetArrayViewFromImage(label) > 0)


@pytest.mark.parametrize("earlier_run", [False, True], ids=["fresh scene", "after a run"])
def test_cancelled_run_leaves_the_scene_unchanged(small_ct, segmenter, earlier_run):
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    if earlier_run:
        mrml_bridge.segment_volume_node(scene, ct_node, segmenter)
    before = scene_state(scene)

    with pytest.raises(Cancelled):
        mrml_bridge.segment_volume_node(scene, ct_node, segmenter, cancel=lambda: True)

    assert scene_state(scene) == before


def test_failing_runs_leave_the_scene_unchanged(ct, segmenter):
    scene = new_scene()
    constant = mrml_bridge.image_to_volume_node(sitk.Image(ct.GetSize(), sitk.sitkFloat32) + 40.0, scene, "flat")
    before = scene_state(scene)

    with pytest.raises(UserError, match="constant"):
        mrml_bridge.segment_volume_node(scene, constant, segmenter)
    assert scene_state(scene) == before

    ct_node = mrml_bridge.image_to_volume_node(ct, scene, "CT")
    before = scene_state(scene)
    with pytest.raises(UserError, match="no attention map named level9"):
        mrml_bridge.segment_volume_node(scene, ct_node, segmenter, attention_names=("combined", "level9"))
    assert scene_state(scene) == before


# --- the panel's path: files read with Slicer's reader, no surface unless asked ----------------------


def test_read_volume_file_places_voxels_as_itk_wrote_them(tmp_path, ct):
    image = sitk.Cast(with_header(ct, DIRECTIONS["oblique"]) > 0, sitk.sitkUInt8)
    path = tmp_path / "mask.nrrd"
    sitk.WriteImage(image, str(path), False)
    scene = new_scene()

    volume = mrml_bridge.read_volume_file(path)
    node = mrml_bridge.image_to_volume_node(image, scene, "reference")

    assert np.allclose(mrml_bridge._matrix_to_numpy(volume.ijk_to_ras), ijk_to_ras(node), atol=1e-4)
    assert volume.image_data.GetSpacing() == (1.0, 1.0, 1.0) and volume.image_data.GetOrigin() == (0.0, 0.0, 0.0)
    assert np.array_equal(voxels(volume.image_data), sitk.GetArrayViewFromImage(image))


READ_WITH_THE_BRIDGE = """
import sys, numpy, slicer
from vtkmodules.util import numpy_support
if sys.argv[2] == "application":  # its ``slicer`` holds only the kits (Base/Python/CMakeLists.txt): there the
    # Teem, ITK and RemoteIO classes are top-level modules, so take slicer-core's flattened copies away
    for name in [name for name in vars(slicer) if name.startswith(("vtkTeem", "vtkITK", "vtkRemoteIO"))]:
        delattr(slicer, name)
from AttentionUNetSegLib import mrml_bridge
volume = mrml_bridge.read_volume_file(sys.argv[1])
print("vtkTeem" in sys.modules, numpy.count_nonzero(numpy_support.vtk_to_numpy(
    volume.image_data.GetPointData().GetScalars())))
"""


@pytest.mark.parametrize("namespace", ["application", "slicer-core"])
def test_read_volume_file_finds_the_nrrd_reader_in_either_slicer(tmp_path, pancreas_label, namespace):
    """N1: Slicer has ``vtkTeem.vtkTeemNRRDReader`` and no ``slicer.vtkTeemNRRDReader``; slicer-core (web app)
    has only the latter. Each in a fresh process, whatever namespace this one was given."""
    import os
    import subprocess
    import sys

    from AttentionUNetSegLib import protocol

    path = tmp_path / "pancreas.nrrd"
    sitk.WriteImage(sitk.Cast(pancreas_label, sitk.sitkUInt8), str(path), False)
    env = protocol.child_environment()
    if namespace == "application":  # Base/Python/vtkTeem.py: ``from vtkTeemPython import *``
        modules = tmp_path / "slicer_python"
        modules.mkdir()
        (modules / "vtkTeem.py").write_text("from slicer_core.vtkTeem import *\n")
        env["PYTHONPATH"] = os.pathsep.join((str(modules), env["PYTHONPATH"]))

    done = subprocess.run([sys.executable, "-c", READ_WITH_THE_BRIDGE, str(path), namespace], capture_output=True,
                          text=True, env=env, check=False)

    assert done.returncode == 0, done.stderr
    used_vtkteem, count = done.stdout.split()
    assert used_vtkteem == str(namespace == "application")
    assert int(count) == np.count_nonzero(sitk.GetArrayViewFromImage(pancreas_label)) > 100


def test_an_unreadable_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.nrrd"
    path.write_text("NRRD0004\ntype: what\n")
    with pytest.raises(UserError, match="cannot read"):
        mrml_bridge.read_volume_file(path)


def test_import_volumes_builds_no_surface_unless_asked(small_ct, pancreas_label, tmp_path):
    scene = new_scene()
    ct_node = read_with_slicer(scene, small_ct)
    path = tmp_path / "mask.nrrd"
    sitk.WriteImage(sitk.Cast(pancreas_label, sitk.sitkUInt8), str(path), False)

    outputs = mrml_bridge.import_volumes(scene, ct_node, mrml_bridge.read_volume_file(path), {})

    segment = outputs.segmentation_node.GetSegmentation().GetSegment("Pancreas")
    assert segment.GetRepresentation("Closed surface") is None
    labels, _, _ = merged_labelmap(outputs.segmentation_node)
    assert np.array_equal(labels > 0, sitk.GetArrayViewFromImage(pancreas_label) > 0)
    assert outputs.segmentation_node.CreateClosedSurfaceRepresentation()  # Show 3D: the rule is registered
    assert segment.GetRepresentation("Closed surface").GetNumberOfPoints() > 100


@pytest.mark.parametrize("label", list(mrml_bridge.ATTENTION_COLOUR_MAPS))
def test_attention_colour_maps_exist_in_a_bare_scene(run, label):
    scene, _, outputs, *_ = run
    node = outputs.attention_nodes["combined"]
    mrml_bridge.set_attention_colour_map(scene, node, label)
    colour = scene.GetNodeByID(node.GetDisplayNode().GetColorNodeID())
    assert colour is not None and colour.GetNumberOfColors() > 1
    count = scene.GetNumberOfNodes()
    mrml_bridge.set_attention_colour_map(scene, node, label)  # twice: the colour node is not added again
    assert scene.GetNumberOfNodes() == count
    mrml_bridge.set_attention_colour_map(scene, node, mrml_bridge.DEFAULT_COLOUR_MAP)


def test_the_default_colour_map_is_the_heat_map_the_import_gives(run):
    scene, _, outputs, *_ = run
    node = outputs.attention_nodes["level3"]
    imported = node.GetDisplayNode().GetColorNodeID()
    mrml_bridge.set_attention_colour_map(scene, node, mrml_bridge.DEFAULT_COLOUR_MAP)
    assert node.GetDisplayNode().GetColorNodeID() == imported == "vtkMRMLPETProceduralColorNodePET-Heat"


def test_importing_the_bridge_loads_no_simpleitk():
    """L9: nothing happens at import (the surface rule is registered on first use) and SimpleITK waits."""
    import subprocess
    import sys

    from AttentionUNetSegLib import protocol

    code = ("import sys, slicer; from AttentionUNetSegLib import mrml_bridge; "
            "print('SimpleITK' in sys.modules, len(slicer.vtkSegmentationConverterFactory.GetInstance()"
            ".GetConverterRules()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=protocol.child_environment(), check=True)
    assert done.stdout.split() == ["False", "0"]
