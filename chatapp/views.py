from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from chatapp import selectors
from chatapp.forms import MessageForm, RoomCreateForm, SignupForm
from chatapp.models import Room
from chatapp.services import MessageRejected, message_create

logger = logging.getLogger(__name__)


def room_list(request: HttpRequest) -> HttpResponse:
    rooms = selectors.rooms_visible_to(request.user)
    return render(request, "chat/room_list.html", {"rooms": rooms, "form": RoomCreateForm()})


@require_http_methods(["GET", "POST"])
def room_create(request: HttpRequest) -> HttpResponse:
    form = RoomCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        room = form.save(commit=False)
        room.created_by = request.user
        room.save()
        logger.info("room created room=%s slug=%s user=%s", room.pk, room.slug, request.user.pk)
        return redirect("room_detail", slug=room.slug)
    status = 400 if request.method == "POST" else 200
    return render(request, "chat/room_create.html", {"form": form}, status=status)


def room_detail(request: HttpRequest, slug: str) -> HttpResponse:
    room = get_object_or_404(selectors.rooms_visible_to(request.user), slug=slug)
    return _render_room(request, room, MessageForm())


def _render_room(request: HttpRequest, room: Room, form: MessageForm, status: int = 200) -> HttpResponse:
    messages = selectors.messages_latest(room)
    # The socket resumes after the newest rendered message, so nothing
    # committed between this render and the connect is missed.
    last_seq = messages[-1].seq if messages else 0
    context = {
        "room": room,
        "messages": messages,
        "first_seq": messages[0].seq if messages else None,
        "last_seq": last_seq,
        "form": form,
        "max_length": settings.CHAT_MESSAGE_MAX_LENGTH,
    }
    return render(request, "chat/room_detail.html", context, status=status)


@require_http_methods(["GET", "POST"])
def room_messages(request: HttpRequest, slug: str) -> HttpResponse:
    """GET: a page of messages before `before`. POST: the form fallback for posting without JavaScript."""
    room = get_object_or_404(selectors.rooms_visible_to(request.user), slug=slug)
    if request.method == "POST":
        return _post_message(request, room)

    raw_before = request.GET.get("before", "")
    if not raw_before.isdigit():
        return HttpResponseBadRequest("before must be a non-negative integer seq.")
    messages = selectors.messages_before(room, int(raw_before))
    context = {"room": room, "messages": messages, "first_seq": messages[0].seq if messages else None}
    template = "chat/_earlier.html" if request.htmx else "chat/room_earlier.html"
    return render(request, template, context)


def _post_message(request: HttpRequest, room: Room) -> HttpResponse:
    form = MessageForm(request.POST)
    if not form.is_valid():
        return _render_room(request, room, form, status=400)
    try:
        message_create(
            room=room, author=request.user, body=form.cleaned_data["body"], client_id=form.cleaned_data["client_id"]
        )
    except MessageRejected as exc:
        form.add_error("client_id" if exc.code.startswith("client_id") else "body", exc.text)
        return _render_room(request, room, form, status=400)
    return redirect(reverse("room_detail", kwargs={"slug": room.slug}) + "#composer")


@login_not_required
@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        logger.info("user signed up user=%s", user.pk)
        return redirect(settings.LOGIN_REDIRECT_URL)
    status = 400 if request.method == "POST" else 200
    return render(request, "registration/signup.html", {"form": form}, status=status)
