"""The saved-subject routes of the ingress (POST/GET/DELETE /v1/subjects) and the lookup of a generate request's
`subjects`. A mixin of FaceDiffuserAPI: it uses the ingress's `config`, `limits`, `encoder`, `_authorize` and
`_call`. What is stored and how generation uses it: serving/subjects.py; where: serving/subject_store.py."""

# No `from __future__ import annotations`: FastAPI must see real types in the route signatures.

import asyncio

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from serving.api import ErrorResponse, GenerateRequest, RequestError
from serving.http_app import ERRORS, api, bearer
from serving.jobs import owner_of
from serving.subject_store import SubjectStore, default_store, view
from serving.subjects import SavedSubject, SubjectRequest, check_compatible, checked_photos


def _owner(credentials: HTTPAuthorizationCredentials | None) -> str:
    """Subjects belong to the token that saved them (the gate has checked it)."""
    return owner_of(credentials.credentials if credentials is not None else None)


def _not_found(subject_id: str) -> RequestError:
    # unknown, deleted, malformed, or another token's: one answer, so ids cannot be probed
    return RequestError(404, "subject_not_found", f"no saved subject {subject_id[:64]!r} for this token")


class SubjectRoutes:
    """POST /v1/subjects, GET /v1/subjects, GET /v1/subjects/ID, DELETE /v1/subjects/ID."""

    def _subject_store(self) -> SubjectStore:
        store = getattr(self, "_subjects", None)
        if store is None:  # built on first use, in the replica: a local default is this machine's cache root
            store = self._subjects = SubjectStore(self.config.subject_store or default_store())
        return store

    def subjects_info(self) -> dict:
        """/v1/info's `subjects`: the store's kind (never its address or credentials) and the cap per token."""
        return {"store": self._subject_store().kind, "max_per_token": self.config.max_subjects_per_token}

    @api.post("/v1/subjects", status_code=201, responses={**ERRORS, 409: {"model": ErrorResponse}})
    async def save_subject(
        self,
        body: SubjectRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ):
        """Encodes the photos of one person once and keeps what generation needs (per photo the subject encoder's
        embedding and the dlib face descriptor; the photos only with `keep_photos`): 201 with the subject's `id`
        (and `Location`). Use it as `"subjects": [id]` in /v1/generate or /v1/jobs in place of `references`."""
        self._authorize(credentials)
        owner, store = _owner(credentials), self._subject_store()
        photos = checked_photos(body, self.limits)
        held = len(await asyncio.to_thread(store.list_subjects, owner))
        if held >= self.config.max_subjects_per_token:
            raise RequestError(
                409,
                "too_many_saved_subjects",
                f"this token keeps {held} saved subjects, the limit; delete one (DELETE /v1/subjects/ID) first",
            )
        mode = body.reference_mode or self.config.reference_mode
        features = await self._call(self.encoder.subject_features, photos, mode)
        if "error" in features:
            raise RequestError(*features["error"])
        saved = await asyncio.to_thread(
            store.save,
            owner,
            features,
            name=body.name,
            reference_mode=mode,
            model_version=features["model_version"],
            photos=photos if body.keep_photos else None,
        )
        location = f"{request.scope.get('root_path', '')}/v1/subjects/{saved['id']}"
        return JSONResponse({**saved, "links": {"self": location}}, status_code=201, headers={"Location": location})

    @api.get("/v1/subjects", responses=ERRORS)
    async def list_subjects(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """This token's saved subjects, oldest first, and how many it may keep."""
        self._authorize(credentials)
        subjects = await asyncio.to_thread(self._subject_store().list_subjects, _owner(credentials))
        return {"subjects": subjects, "max_per_token": self.config.max_subjects_per_token}

    @api.get("/v1/subjects/{subject_id}", responses=ERRORS)
    async def subject(self, subject_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """One saved subject: id, name, photos, faces found, reference mode, model version, created."""
        self._authorize(credentials)
        record = await asyncio.to_thread(self._subject_store().record, _owner(credentials), subject_id)
        if record is None:
            raise _not_found(subject_id)
        return view(record)

    @api.delete("/v1/subjects/{subject_id}", responses=ERRORS)
    async def delete_subject(self, subject_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Erases the subject: its embeddings, descriptors, kept photos and metadata, from the store. The encoder
        never caches what a saved subject holds, so nothing of it stays in memory either."""
        self._authorize(credentials)
        if not await asyncio.to_thread(self._subject_store().delete, _owner(credentials), subject_id):
            raise _not_found(subject_id)
        return {"id": subject_id, "deleted": True}

    async def _saved_subjects(
        self, body: GenerateRequest, credentials: HTTPAuthorizationCredentials | None
    ) -> list[SavedSubject]:
        """A request's `subjects`, read from the store: 404 for one this token does not have, 422 for one saved in
        another reference mode or by another model than this request would use."""
        mode = body.reference_mode or self.config.reference_mode
        owner, store = _owner(credentials), self._subject_store()
        subjects = await asyncio.to_thread(lambda: [store.load(owner, subject_id) for subject_id in body.subjects])
        model_version = (await self._call(self.encoder.model))["model_version"]
        for subject_id, subject in zip(body.subjects, subjects):
            if subject is None:
                raise _not_found(subject_id)
            check_compatible(subject_id, subject.reference_mode, subject.model_version, mode, model_version)
        return subjects
