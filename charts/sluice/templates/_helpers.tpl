{{/* The name every object of the control plane carries. */}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-control-plane" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "sluice.selectorLabels" . }}
{{- end -}}

{{/* Labels that select the control-plane pods; never change them on upgrade. */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: sluice-control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the webhooks' serving certificate. */}}
{{- define "sluice.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "sluice.fullname" .) -}}
{{- end -}}

{{/* The Service's in-cluster DNS name (what webhooks and proxies dial). */}}
{{- define "sluice.serviceHost" -}}
{{- printf "%s.%s.svc" (include "sluice.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Whether RoutePolicy objects are the policy source. */}}
{{- define "sluice.kubernetesSource" -}}
{{- if eq .Values.policies.source "kubernetes" }}true{{ end -}}
{{- end -}}

{{/* Whether the control plane watches EndpointSlices. */}}
{{- define "sluice.watchesEndpoints" -}}
{{- if or (eq .Values.policies.source "kubernetes") .Values.discovery.endpoints }}true{{ end -}}
{{- end -}}

{{- /* A tag YAML reads as a number (a date, a build number) is written as an integer,
not as a Go format error or in float notation. */ -}}
{{- define "sluice.image" -}}
{{- $tag := default .defaultTag .tag -}}
{{- if kindIs "float64" $tag -}}{{- $tag = int64 $tag -}}{{- end -}}
{{- printf "%s:%v" .repository $tag -}}
{{- end -}}

{{/* The Secret holding the mesh CA's root and key (`--ca-secret`). */}}
{{- define "sluice.caSecretName" -}}
{{- default (printf "%s-ca" (include "sluice.fullname" .)) .Values.identity.caSecretName -}}
{{- end -}}

{{/* The Secret holding the control plane's admin token (key `token`). */}}
{{- define "sluice.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "sluice.fullname" .)) .Values.controlPlane.adminTokenSecret -}}
{{- end -}}
