"""The latent-conditioned 3D Gaussian avatar: layout, model, losses, relocation, file format."""

from perse_ray.avatar.io import Avatar, AvatarFormatError, export_ply, load_avatar, save_avatar
from perse_ray.avatar.layout import AttributeLayout, LatentLayout
from perse_ray.avatar.model import AvatarModel

__all__ = ["Avatar", "AvatarFormatError", "AvatarModel", "AttributeLayout", "LatentLayout", "export_ply",
           "load_avatar", "save_avatar"]
