from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm

from chatapp.models import Room


class RoomCreateForm(forms.ModelForm):
    class Meta:
        model = Room
        fields = ["slug", "title"]
        help_texts = {"slug": "Letters, digits, hyphens and underscores; it becomes the room's address."}


class MessageForm(forms.Form):
    """Validate one posted message, whichever entry point it came through."""

    body = forms.CharField(
        strip=True,
        max_length=settings.CHAT_MESSAGE_MAX_LENGTH,
        widget=forms.Textarea(attrs={"rows": 2}),
        error_messages={
            "required": "Message is empty.",
            "max_length": "Message is longer than %(limit_value)d characters (it has %(show_value)d).",
        },
    )
    client_id = forms.CharField(
        required=False,
        max_length=64,
        widget=forms.HiddenInput,
        error_messages={"max_length": "client_id is longer than %(limit_value)d characters."},
    )

    def clean_client_id(self) -> str | None:
        return self.cleaned_data["client_id"] or None


class SignupForm(UserCreationForm):
    class Meta(UserCreationForm.Meta):
        fields = ["username"]
