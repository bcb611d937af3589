"""The system entities a model may refer to; they have no table of their own here."""

from __future__ import annotations

__all__ = ["FILE_ENTITIES", "SYSTEM_ENTITIES", "USER_ENTITY", "USER_ROLES"]

# A user is a row of sync.user_role's user ids; [%CurrentUser%] is the session user's id.
USER_ENTITY = "System.User"
# The association from a user to their roles, read from sync.user_role.
USER_ROLES = "System.UserRoles"
FILE_ENTITIES = frozenset({"System.FileDocument", "System.Image"})
SYSTEM_ENTITIES = FILE_ENTITIES | {USER_ENTITY}
